"""The DiT commands: shipped stage configs, jobs.export (loads in diffusers), jobs.sample, bad arguments,
and a 2-worker CPU Ray Train run of a joint image-video stage through jobs.train."""
from __future__ import annotations

import json
import os
import sys
import tomllib
import types
from pathlib import Path

import av
import pytest
import torch

from jobs.export import main as export_job
from jobs.sample import main as sample_job
from jobs.train import STAGES, load_stage
from jobs.train import main as train_job
from trainer.checkpoint import checkpoint_step, latest_checkpoint, load_checkpoint
from trainer.models.dit import DiT, DiTConfig
from trainer.runtime import LocalRun
from trainer.train_dit import config_from_dict
from trainer.train_dit import main as train_dit

sys.path.append(str(Path(__file__).resolve().parents[1]))  # tests/dit_fixtures.py, shared with tests/trainer
import dit_fixtures  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    # As tests/trainer/conftest.py: two spinning OpenMP threads on this busy 2-core machine are far slower.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    # The same folder tests/trainer's session fixture builds into: one build per session.
    return dit_fixtures.build_assets(tmp_path_factory.getbasetemp() / "dit_assets")


@pytest.fixture(scope="module")
def checkpoint(assets, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("dit_job_run")
    train_dit(config_from_dict(dit_fixtures.dit_stage(assets, train={"steps": 2, "ckpt_every": 2, "sample_every": 2},
                                                      optim={"warmup_steps": 1})),
              LocalRun(run, device=CPU))
    return latest_checkpoint(run)


def test_shipped_dit_configs_are_the_progressive_recipe() -> None:
    assert STAGES["dit"] == "trainer.train_dit"
    s256 = load_stage(REPO / "jobs/configs/dit_256.toml")
    s512 = load_stage(REPO / "jobs/configs/dit_512.toml")
    tiny = load_stage(REPO / "jobs/configs/dit_tiny.toml")
    for cfg in (s256, s512):
        assert cfg.model.preset == "2b" and cfg.text.model == "google/t5-v1_1-xxl" and cfg.text.max_length == 226
        assert cfg.diffusion.schedule_config().snr_shift_scale == 3.0 and cfg.text.dropout == 0.1
        assert (cfg.optim.betas, cfg.optim.eps, cfg.optim.weight_decay, cfg.optim.grad_clip) == ((0.9, 0.95), 1e-8, 1e-4, 1.0)
        assert cfg.optim.schedule == "cosine" and cfg.optim.warmup_steps > 0
        frames = {int(b.split("x")[0]) for b in cfg.data.buckets}
        assert 1 in frames and 49 in frames  # joint image-video
    assert s256.train.init_from == "" and Path(s512.train.init_from).name == s256.ray.name
    assert max(int(b.split("x")[1]) for b in s512.data.buckets) > max(int(b.split("x")[1]) for b in s256.data.buckets)
    assert tiny.model.preset == "tiny" and tiny.standins.text and tiny.vae.scale_batches > 0


def _frames(path: Path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def test_export_loads_in_diffusers_and_gives_the_same_output(checkpoint, tmp_path) -> None:
    diffusers = pytest.importorskip("diffusers")
    out = tmp_path / "diffusers"
    assert export_job(["--checkpoint", str(checkpoint), "--to", "diffusers", "--output", str(out)]) == 0
    ref = diffusers.CogVideoXTransformer3DModel.from_pretrained(out / "transformer").eval()
    sched = diffusers.CogVideoXDDIMScheduler.from_pretrained(out / "scheduler")
    assert sched.config.prediction_type == "v_prediction"

    state, _ = load_checkpoint(checkpoint, rank=0)
    cfg = DiTConfig(**state["dit_config"])
    ours = DiT(cfg).eval()
    ours.load_state_dict(state["ema"])
    torch.manual_seed(1)
    latents = torch.randn(2, 3, cfg.in_channels, 8, 8)  # (B, T, C, H, W)
    text = torch.randn(2, cfg.max_text_len, cfg.text_dim)
    t = torch.tensor([100, 800])
    pipe = types.SimpleNamespace(transformer=ref, vae_scale_factor_spatial=8)
    rotary = diffusers.CogVideoXPipeline._prepare_rotary_positional_embeddings(pipe, 64, 64, 3, CPU)
    with torch.no_grad():
        expected = ref(latents, text, t, image_rotary_emb=rotary, return_dict=False)[0]
        got = ours(latents, text, t)
    assert (got - expected).abs().max().item() <= 1e-4
    reference = json.loads((out / "text_encoder" / "reference.json").read_text())
    assert reference["pretrained"] == state["text_encoder"]["model"]


def test_sample_job_writes_an_mp4_per_prompt_and_a_sheet(checkpoint, tmp_path, capsys) -> None:
    out = tmp_path / "samples"
    rc = sample_job(["--checkpoint", str(checkpoint.parent), "--prompt", "a red car drives through snow",
                     "--prompt", "a cat", "--frames", "5", "--steps", "2", "--guidance", "4", "--output", str(out)])
    assert rc == 0
    videos = sorted(out.glob("sample_step000002_*.mp4"))
    assert len(videos) == 2 and all(_frames(p) == 5 for p in videos)
    assert (out / "samples_step000002.png").is_file()
    assert "stand-in" in capsys.readouterr().out  # the summary names the text encoder a stand-in


@pytest.mark.parametrize("job,argv,message", [
    (sample_job, ["--prompt", "x"], "--checkpoint"),
    (sample_job, ["--checkpoint", "{ckpt}", "--prompt", "x", "--frames", "8"], "4k+1"),
    (sample_job, ["--checkpoint", "{ckpt}", "--prompt", "x", "--height", "40"], "multiple of 16"),
    (sample_job, ["--checkpoint", "{missing}", "--prompt", "x"], "no such folder"),
    (sample_job, ["--checkpoint", "{vae}", "--prompt", "x"], "expected a DiT stage checkpoint"),
    (export_job, ["--checkpoint", "{ckpt}", "--to", "onnx", "--output", "{out}"], "invalid choice"),
    (export_job, ["--checkpoint", "{vae}", "--to", "diffusers", "--output", "{out}"], "expected a DiT stage checkpoint"),
    (export_job, ["--checkpoint", "{ckpt}", "--to", "diffusers", "--output", "{ckpt}"], "empty or absent"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_arguments_are_one_line_and_exit_2(job, argv, message, checkpoint, assets, tmp_path, capsys) -> None:
    values = {"ckpt": str(checkpoint), "missing": str(tmp_path / "nope"), "vae": str(assets["vae"]),
              "out": str(tmp_path / "out")}
    assert job([a.format(**values) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ray_workers_train_a_joint_image_video_stage_and_write_samples(strategy, assets, tmp_path) -> None:
    import ray

    os.environ["RAY_AUTH_MODE"] = "disabled"
    # The shipped sample-sized config, pointed at the test's shards, VAE and stand-in T5.
    data = tomllib.loads((REPO / "jobs/configs/dit_tiny.toml").read_text())
    data["vae"] |= {"checkpoint": str(assets["vae"]), "scale_batches": 0}
    data["text"] |= {"model": str(assets["t5"]), "max_length": 16}
    data["data"] |= {"root": str(assets["shards"]), "buckets": [dit_fixtures.VIDEO, dit_fixtures.IMAGE],
                     "batch_sizes": [1, 2], "weights": [0.5, 0.5], "num_workers": 0}
    data["optim"] |= {"warmup_steps": 1}
    data["train"] |= {"steps": 4, "log_every": 1, "ckpt_every": 2, "sample_every": 4, "strategy": strategy}
    data["sample"] |= {"frames": 9, "height": 32, "width": 32, "steps": 3}
    data["ray"] |= {"workers": 2, "storage_path": str(tmp_path / "runs"), "name": "dit_ray"}
    config = tmp_path / "dit.toml"
    config.write_text(_toml(data))
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        assert train_job(["--config", str(config)]) == 0
    finally:
        ray.shutdown()
    final = latest_checkpoint(tmp_path / "runs" / "dit_ray")
    assert final is not None and checkpoint_step(final) == 4
    assert {p.name for p in final.glob("rng_rank*.pt")} == {"rng_rank0.pt", "rng_rank1.pt"}
    videos = sorted(final.glob("sample_step000004_*.mp4"))
    assert len(videos) == len(data["sample"]["prompts"]) and all(_frames(p) == 9 for p in videos)
    assert (final / "samples_step000004.png").is_file()
    state, _ = load_checkpoint(final, rank=0)
    # Joint image-video: both kinds of bucket were drawn (the draw is the same on both ranks).
    position = state["data_position"]
    assert position["step"] == 4 and position["position"][dit_fixtures.VIDEO] > 0
    assert position["position"][dit_fixtures.IMAGE] > 0
    # Under FSDP2 (one shard unit per block) the checkpoint still holds full weights: they load into a plain DiT.
    model = DiT(DiTConfig(**state["dit_config"]))
    model.load_state_dict(state["model"])
    model.load_state_dict(state["ema"])


def _toml(data: dict) -> str:
    """A flat two-level TOML writer for the stage tables (no tomli_w here)."""
    lines = []
    for section, table in data.items():
        lines.append(f"[{section}]")
        for key, value in table.items():
            lines.append(f"{key} = {json.dumps(value)}")
        lines.append("")
    return "\n".join(lines)
