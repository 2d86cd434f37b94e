"""jobs.precompute through the real job: the same bucket layout with latent/text members, the DiT loader
gives the latents (and the DiT stage the loss) of on-the-fly encoding, complete tars are skipped on a re-run,
a half-written tar never appears under a final name, and another VAE or text encoder is refused."""
from __future__ import annotations

import itertools
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from catalog.shards import read_manifest
from jobs.precompute import STATE_DIR
from jobs.precompute import main as precompute
from trainer.data import DiTBatches, DiTDataConfig, batch_latents, batch_text, posterior_generator
from trainer.runtime import LocalRun
from trainer.sampling import load_vae
from trainer.text import TextConfig, TextEncoder
from trainer.train_dit import config_from_dict
from trainer.train_dit import main as train_dit

sys.path.append(str(Path(__file__).resolve().parents[1]))  # tests/dit_fixtures.py, shared with tests/trainer
import dit_fixtures  # noqa: E402

CPU = torch.device("cpu")
MAX_LENGTH = 16  # dit_fixtures.dit_stage's [text] max_length


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    return dit_fixtures.build_assets(tmp_path_factory.getbasetemp() / "dit_assets")


@pytest.fixture(scope="module")
def ray_local():
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    if started:
        ray.shutdown()


def _config(path: Path, max_length: int = MAX_LENGTH) -> Path:
    path.write_text(f"[data]\nbatch_size = 3\n\n[text]\nmax_length = {max_length}\n\n"
                    "[ray]\nactors = 2\ncpus_per_actor = 0.5\n")
    return path


def _run(assets: dict, out: Path, config: Path, *extra: str) -> int:
    return precompute(["--shards", str(assets["shards"]), "--vae", str(assets["vae"]), "--text-encoder",
                       str(assets["t5"]), "--output", str(out), "--config", str(config), *extra])


@pytest.fixture(scope="module")
def latents(assets, ray_local, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("precompute") / "latents"
    assert _run(assets, out, _config(out.parent / "precompute.toml")) == 0
    return out


def _members(tar_path: Path) -> dict[str, set[str]]:
    keys: dict[str, set[str]] = {}
    with tarfile.open(tar_path) as tar:
        for m in tar:
            key, ext = m.name.split(".", 1)
            keys.setdefault(key, set()).add(ext)
    return keys


def test_same_buckets_and_tars_with_latent_and_text_members(assets, latents) -> None:
    src, out = read_manifest(assets["shards"]), read_manifest(latents)
    assert sorted(out["buckets"]) == sorted(src["buckets"]) and out["samples"] == src["samples"] == 16
    for name, b in src["buckets"].items():
        assert [s["shard"] for s in out["buckets"][name]["shards"]] == [s["shard"] for s in b["shards"]]
        for s in b["shards"]:
            pixels, pre = _members(assets["shards"] / s["shard"]), _members(latents / s["shard"])
            assert sorted(pre) == sorted(pixels)  # the same samples, tar by tar
            assert all(v == {"latent.npy", "text.npy", "text_mask.npy", "txt", "json"} for v in pre.values())
    assert out["source"] == "precompute" and out["errors"] == []
    assert "stand-in" in out["text"]["standin"] and out["latent_scale"] > 0
    assert not list(latents.rglob("*.tmp"))


def test_the_dit_loader_gives_the_on_the_fly_latents_and_text(assets, latents) -> None:
    vae, _ = load_vae(assets["vae"])
    encoder = TextEncoder(TextConfig(model=str(assets["t5"]), max_length=MAX_LENGTH), CPU)
    kw = {"buckets": (dit_fixtures.VIDEO, dit_fixtures.IMAGE), "weights": (0.5, 0.5), "batch_sizes": (2, 3),
          "num_workers": 0}
    pre = list(itertools.islice(DiTBatches(DiTDataConfig(root=str(latents), **kw), seed=4), 6))
    fly = list(itertools.islice(DiTBatches(DiTDataConfig(root=str(assets["shards"]), **kw), seed=4), 6))
    assert {b["bucket"] for b in pre} == {dit_fixtures.VIDEO, dit_fixtures.IMAGE}
    for p, q in zip(pre, fly, strict=True):
        assert p["keys"] == q["keys"] and "pixels" not in p and "pixels" in q
        z_pre = batch_latents(p, scale=1.3, generator=posterior_generator(0, p["step"], 0))
        z_fly = batch_latents(q, scale=1.3, vae=vae, generator=posterior_generator(0, q["step"], 0))
        assert z_pre.shape == z_fly.shape and torch.allclose(z_pre, z_fly, atol=1e-5, rtol=0)
        e_pre, m_pre = batch_text(p)
        e_fly, m_fly = batch_text(q, encoder=encoder)
        assert torch.equal(m_pre, m_fly) and torch.allclose(e_pre, e_fly, atol=1e-5, rtol=0)


def test_training_from_precomputed_latents_gives_the_on_the_fly_loss(assets, latents, tmp_path) -> None:
    losses = {}
    for name, root in (("fly", assets["shards"]), ("pre", latents)):
        cfg = config_from_dict(dit_fixtures.dit_stage(assets, data={"root": str(root)},
                                                      train={"steps": 3, "ckpt_every": 3, "sample_every": 3},
                                                      sample={"prompts": []}))
        run = LocalRun(tmp_path / name, device=CPU)
        train_dit(cfg, run)
        losses[name] = [m["loss"] for m in run.history]
    assert len(losses["pre"]) == 3
    assert losses["pre"] == pytest.approx(losses["fly"], abs=1e-5, rel=0)


def test_a_rerun_skips_complete_tars_and_redoes_a_killed_one(assets, latents, tmp_path) -> None:
    config = _config(tmp_path / "precompute.toml")
    tars = sorted(latents.rglob("shard-*.tar"))
    before = {p: p.stat().st_mtime_ns for p in tars}
    # A killed attempt: one tar never renamed into place (its temporary left behind), its result never written.
    victim = tars[0]
    rel = f"{victim.parent.name}/{victim.name}"
    staging = latents / STATE_DIR / "staging" / rel.replace("/", "_") / victim.parent.name
    staging.mkdir(parents=True)
    (staging / ".shard-000000.tar.tmp").write_bytes(victim.read_bytes()[:1000])
    victim_bytes = victim.read_bytes()
    victim.unlink()
    (latents / STATE_DIR / "done" / f"{rel.replace('/', '_')}.json").unlink()
    assert _run(assets, latents, config) == 0
    for p, mtime in before.items():
        if p != victim:
            assert p.stat().st_mtime_ns == mtime, f"{p} was rewritten"
    assert victim.read_bytes() == victim_bytes  # re-encoded to the same bytes
    assert not (latents / STATE_DIR / "staging" / rel.replace("/", "_")).exists()
    assert read_manifest(latents)["samples"] == 16


def test_another_text_encoder_in_the_same_output_is_refused(assets, latents, tmp_path, capsys) -> None:
    assert _run(assets, latents, _config(tmp_path / "other.toml", max_length=MAX_LENGTH + 8)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "another input, VAE or text encoder" in err and "--overwrite" in err


def test_missing_arguments_are_one_line_and_exit_2(tmp_path, capsys) -> None:
    assert precompute(["--output", str(tmp_path / "x")]) == 2
    assert "--shards" in capsys.readouterr().err
    assert precompute(["--shards", str(tmp_path), "--vae", str(tmp_path), "--output", str(tmp_path / "x")]) == 2
    assert "manifest.json" in capsys.readouterr().err
