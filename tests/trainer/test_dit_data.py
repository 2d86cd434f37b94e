"""DiT batches: one bucket per step, same draw on every rank, resumable position, DataLoader workers,
bad samples counted and skipped, precomputed latent/text members, the latent scale factor."""
from __future__ import annotations

import itertools
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from catalog.shards import Bucket, BucketTarWriter, encode_meta, make_manifest, parse_bucket, write_manifest
from trainer.data import (
    BadDataError,
    BadSampleWarning,
    DiTBatches,
    DiTDataConfig,
    batch_latents,
    batch_text,
    check_data,
    decode_sample,
    encode_precomputed,
    measure_latent_scale,
    posterior_generator,
    resolve_latent_scale,
    sample_posterior,
    save_latent_scale,
)
from trainer.models.vae import CausalVAE, vae_config
from trainer.synthetic import encode_mp4, synthetic_clip, synthetic_files, write_synthetic_shards

VIDEO, IMAGE = "5x16x16", "1x16x16"


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dit_shards")
    return write_synthetic_shards(root, {VIDEO: list(range(12)), IMAGE: list(range(100, 110))}, per_shard=3)


def config(root: Path, **kw) -> DiTDataConfig:
    base = {"root": str(root), "buckets": (VIDEO, IMAGE), "weights": (0.5, 0.5), "batch_sizes": (2, 3),
            "num_workers": 0, "shardshuffle": True}
    return DiTDataConfig(**(base | kw))


def take(batches: DiTBatches, n: int) -> list[dict]:
    return list(itertools.islice(iter(batches), n))


def test_batches_have_one_shape_per_step_and_say_their_kind(shards: Path) -> None:
    got = take(DiTBatches(config(shards), seed=0), 10)
    assert [b["step"] for b in got] == list(range(1, 11))
    assert {b["bucket"] for b in got} == {VIDEO, IMAGE}
    for b in got:
        if b["bucket"] == VIDEO:
            assert b["kind"] == "video" and b["pixels"].shape == (2, 3, 5, 16, 16)
            assert b["fps"].tolist() == [8.0, 8.0]
        else:
            assert b["kind"] == "image" and b["pixels"].shape == (3, 3, 1, 16, 16)
            assert b["fps"].tolist() == [0.0, 0.0, 0.0]
        assert b["pixels"].dtype == torch.uint8
        assert len(b["captions"]) == len(b["keys"]) == b["pixels"].shape[0]
        assert all(c.startswith("synthetic blobs, seed") for c in b["captions"])


def test_pixels_are_the_decoded_samples_exactly(shards: Path) -> None:
    b = take(DiTBatches(config(shards, shardshuffle=False), seed=0), 1)[0]
    seed = int(b["keys"][0].removeprefix("synthetic"))
    sample = {"__key__": b["keys"][0]} | synthetic_files(seed, b["bucket"])
    assert torch.equal(b["pixels"][0].float() / 127.5 - 1.0, decode_sample(sample, b["bucket"]))


def test_two_ranks_draw_the_same_bucket_and_different_samples(shards: Path) -> None:
    r0 = take(DiTBatches(config(shards), seed=3, rank=0, world_size=2), 8)
    r1 = take(DiTBatches(config(shards), seed=3, rank=1, world_size=2), 8)
    assert [b["bucket"] for b in r0] == [b["bucket"] for b in r1]
    for bucket, n in ((VIDEO, 12), (IMAGE, 10)):
        k0 = [k for b in r0 if b["bucket"] == bucket for k in b["keys"]]
        k1 = [k for b in r1 if b["bucket"] == bucket for k in b["keys"]]
        m = min(len(k0), len(k1), n // 2)  # within one epoch the ranks' samples are disjoint
        assert m > 0 and not set(k0[:m]) & set(k1[:m])


def test_resume_gives_the_same_next_batches_as_an_uninterrupted_iterator(shards: Path) -> None:
    cfg = config(shards)
    whole = take(DiTBatches(cfg, seed=5), 9)
    first = DiTBatches(cfg, seed=5)
    take(first, 4)
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    assert state["step"] == 4 and sum(state["position"].values()) == sum(b["window"] for b in whole[:4])
    rest = take(DiTBatches(cfg, seed=5, state=state), 5)
    assert [b["step"] for b in rest] == [5, 6, 7, 8, 9]
    for a, b in zip(whole[4:], rest, strict=True):
        assert a["bucket"] == b["bucket"] and a["keys"] == b["keys"]
        assert torch.equal(a["pixels"], b["pixels"])


def test_two_workers_give_the_same_batches_as_none(shards: Path) -> None:
    inline = take(DiTBatches(config(shards, num_workers=0), seed=1), 8)
    workers = DiTBatches(config(shards, num_workers=2), seed=1)
    parallel = take(workers, 8)
    assert [b["step"] for b in parallel] == list(range(1, 9))
    for a, b in zip(inline, parallel, strict=True):
        assert a["bucket"] == b["bucket"] and a["keys"] == b["keys"] and torch.equal(a["pixels"], b["pixels"])
    # The position is what the trainer received, not what the workers prefetched.
    assert workers.state_dict()["step"] == 8
    assert sum(workers.state_dict()["position"].values()) == sum(b["window"] for b in inline)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def _meta(key: str, bucket: str) -> dict:
    return {"clip_id": key, "video_id": key, "span": [0, 5], "fps": 8.0, "frames": 5, "bucket": bucket, "scores": {}}


def finish(root: Path, writer: BucketTarWriter) -> None:
    """Close the writer and put down the manifest, as the shard writers do (the loader reads complete folders)."""
    write_manifest(root, make_manifest(writer.close(), {VIDEO: Bucket(*parse_bucket(VIDEO), 8.0)}))


def write_bad_bucket(root: Path, bad: dict[int, str], n: int = 12, per_shard: int = 4) -> Path:
    """Bucket VIDEO with ``n`` samples; sample i in ``bad`` is broken as named (no_caption/wrong_shape/garbage)."""
    writer = BucketTarWriter(root, VIDEO, maxcount=per_shard, maxsize=2**62)
    for i in range(n):
        key = f"clip{i:04d}"
        files = synthetic_files(i, VIDEO)
        kind = bad.get(i)
        if kind == "no_caption":
            files.pop("txt")
        elif kind == "wrong_shape":
            files["mp4"] = encode_mp4(synthetic_clip(i, 9, 16, 16))
        elif kind == "garbage":
            files["mp4"] = b"\x00\x01 this is not an mp4" * 20
        files["json"] = encode_meta(_meta(key, VIDEO))
        writer.write(key, files)
    finish(root, writer)
    return root


def test_bad_samples_are_counted_skipped_and_the_batch_keeps_its_size(tmp_path: Path) -> None:
    root = write_bad_bucket(tmp_path, {1: "no_caption", 4: "wrong_shape", 6: "garbage"})
    cfg = DiTDataConfig(root=str(root), buckets=(VIDEO,), weights=(1.0,), batch_sizes=(2,), shardshuffle=False,
                        num_workers=0, max_bad_fraction=0.5, bad_check_after=1)
    batches = DiTBatches(cfg, seed=0)
    with pytest.warns(BadSampleWarning) as caught:
        got = take(batches, 6)  # one epoch: 12 samples
    reasons = " | ".join(str(w.message) for w in caught)
    assert "no caption" in reasons and "expected (5, 16, 16)" in reasons and "clip0006" in reasons
    assert all(b["pixels"].shape == (2, 3, 5, 16, 16) for b in got)
    seen = [k for b in got for k in b["keys"]]
    assert not {"clip0001", "clip0004", "clip0006"} & set(seen)
    m = batches.metrics()
    assert m["data_bad_samples"] == 3 and m["data_samples_read"] == 12 and m["data_bad_fraction"] == 0.25
    assert sum(batches.state_dict()["bad_by_shard"].values()) == 3


def test_bad_samples_give_the_same_batches_with_two_workers(tmp_path: Path) -> None:
    root = write_bad_bucket(tmp_path, {1: "no_caption", 4: "wrong_shape", 6: "garbage"})
    cfg = DiTDataConfig(root=str(root), buckets=(VIDEO,), weights=(1.0,), batch_sizes=(2,), shardshuffle=False,
                        num_workers=0, max_bad_fraction=0.5, bad_check_after=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadSampleWarning)
        inline = DiTBatches(cfg, seed=0)
        a = take(inline, 6)
        parallel = DiTBatches(DiTDataConfig(**{**_fields(cfg), "num_workers": 2}), seed=0)
        b = take(parallel, 6)
    assert [x["keys"] for x in a] == [x["keys"] for x in b]
    assert inline.metrics() == parallel.metrics()


def _fields(cfg: DiTDataConfig) -> dict:
    return {f: getattr(cfg, f) for f in cfg.__dataclass_fields__}


def test_too_many_bad_samples_stop_with_an_error_naming_the_shard(tmp_path: Path) -> None:
    root = write_bad_bucket(tmp_path, {5: "garbage", 6: "no_caption"})  # both in shard-000001
    cfg = DiTDataConfig(root=str(root), buckets=(VIDEO,), weights=(1.0,), batch_sizes=(2,), shardshuffle=False,
                        num_workers=0, max_bad_fraction=0.1, bad_check_after=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadSampleWarning)
        with pytest.raises(BadDataError, match=r"1 of 6 samples read were bad \(16.7% > max_bad_fraction 10.0%\); last: sample clip0005 in shard .*shard-000001\.tar"):
            take(DiTBatches(cfg, seed=0), 6)


def test_a_bucket_of_only_bad_samples_fails_in_the_worker_naming_the_shard(tmp_path: Path) -> None:
    root = write_bad_bucket(tmp_path, dict.fromkeys(range(4), "garbage"), n=4)
    cfg = DiTDataConfig(root=str(root), buckets=(VIDEO,), weights=(1.0,), batch_sizes=(2,), shardshuffle=False,
                        num_workers=2, max_bad_run=8)
    with pytest.raises(BadDataError, match=r"could not fill a batch of 2 .*5x16x16/shard-000000\.tar"):
        take(DiTBatches(cfg, seed=0), 2)


def test_check_data_fails_before_any_model_on_missing_or_empty_selections(shards: Path, tmp_path: Path) -> None:
    assert check_data(config(shards)) == {VIDEO: 12, IMAGE: 10}
    with pytest.raises(FileNotFoundError, match=r"bucket 17x16x16: expected the folder .*holds \['1x16x16', '5x16x16'\]"):
        check_data(config(shards, buckets=(VIDEO, "17x16x16")))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_data(config(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="buckets is empty"):
        check_data(DiTDataConfig(root=str(shards)))
    empty = tmp_path / "empty"
    (empty / VIDEO).mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="incomplete: .*manifest.json is missing"):
        check_data(config(empty, buckets=(VIDEO,), weights=(1.0,), batch_sizes=(1,)))
    with pytest.warns(UserWarning, match="incomplete"), pytest.raises(FileNotFoundError, match="no shards for bucket 5x16x16"):
        check_data(config(empty, buckets=(VIDEO,), weights=(1.0,), batch_sizes=(1,), allow_partial=True))
    (tmp_path / "none").mkdir()
    none = write_synthetic_shards(tmp_path / "none", {})  # a --where that selected nothing
    with pytest.raises(ValueError, match="the selection is empty"):
        check_data(config(none))


def test_config_checks_its_values(shards: Path) -> None:
    with pytest.raises(ValueError, match="same length"):
        config(shards, weights=(1.0,))
    with pytest.raises(ValueError, match="max_bad_fraction"):
        config(shards, max_bad_fraction=1.0)


# ---------------------------------------------------------------------------------------------
# Precomputed members and latents
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vae() -> CausalVAE:
    torch.manual_seed(0)
    return CausalVAE(vae_config("tiny")).eval()


def write_precomputed(root: Path, pixels_root: Path, vae: CausalVAE, text_dim: int = 8) -> dict[str, tuple]:
    """The VIDEO bucket of ``pixels_root`` with moments from ``vae`` and random text in place of the mp4."""
    import webdataset as wds

    writer = BucketTarWriter(root, VIDEO, maxcount=3, maxsize=2**62)
    written = {}
    for url in sorted((pixels_root / VIDEO).glob("shard-*.tar")):
        for sample in wds.DataPipeline(wds.SimpleShardList([str(url)]), wds.tarfile_to_samples()):
            x = decode_sample(sample, VIDEO)[None]  # (1, 3, 5, 16, 16)
            with torch.no_grad():
                mean, logvar = vae.encode_moments(x)
            g = torch.Generator().manual_seed(len(written))
            emb, mask = torch.randn(226, text_dim, generator=g), torch.arange(226) < 7
            files = {"txt": sample["txt"], "json": sample["json"]} | encode_precomputed(mean[0], logvar[0], emb, mask)
            writer.write(sample["__key__"], files)
            written[sample["__key__"]] = (mean[0], logvar[0], emb, mask)
    finish(root, writer)
    return written


def test_precomputed_members_are_read_and_give_the_on_the_fly_latents(shards: Path, tmp_path: Path,
                                                                      vae: CausalVAE) -> None:
    written = write_precomputed(tmp_path, shards, vae)
    kw = {"buckets": (VIDEO,), "weights": (1.0,), "batch_sizes": (2,)}
    pre = take(DiTBatches(config(tmp_path, **kw), seed=2), 3)
    pix = take(DiTBatches(config(shards, **kw), seed=2), 3)
    for p, q in zip(pre, pix, strict=True):
        assert "pixels" not in p and p["latent_mean"].shape == (2, 16, 2, 2, 2) and p["keys"] == q["keys"]
        for i, key in enumerate(p["keys"]):
            mean, logvar, emb, mask = written[key]
            assert torch.equal(p["latent_mean"][i], mean) and torch.equal(p["latent_logvar"][i], logvar)
            assert torch.equal(p["text_embedding"][i], emb) and torch.equal(p["text_mask"][i], mask)
        emb, mask = batch_text(p)
        assert emb.shape == (2, 226, 8) and mask.dtype == torch.bool and mask.sum(1).tolist() == [7, 7]
        # Same posterior noise seed -> same x0 from precomputed moments and from the VAE on the fly.
        z_pre = batch_latents(p, scale=1.15, generator=posterior_generator(0, p["step"], 0))
        z_fly = batch_latents(q, scale=1.15, vae=vae, generator=posterior_generator(0, q["step"], 0))
        assert z_pre.shape == (2, 16, 2, 2, 2) and torch.allclose(z_pre, z_fly, atol=1e-5)
    with pytest.raises(ValueError, match="a VAE is needed"):
        batch_latents(pix[0], scale=1.0)
    with pytest.raises(ValueError, match="a text encoder is needed"):
        batch_text(pix[0])


def test_a_latent_of_the_wrong_shape_is_a_bad_sample(tmp_path: Path) -> None:
    writer = BucketTarWriter(tmp_path, VIDEO, maxcount=8, maxsize=2**62)
    for i in range(4):
        t = 3 if i == 2 else 2  # 5 frames -> 2 latent frames
        files = {"txt": b"a caption", "json": encode_meta(_meta(f"k{i}", VIDEO))}
        files |= encode_precomputed(torch.zeros(16, t, 2, 2), torch.zeros(16, t, 2, 2))
        writer.write(f"k{i}", files)
    finish(tmp_path, writer)
    cfg = DiTDataConfig(root=str(tmp_path), buckets=(VIDEO,), weights=(1.0,), batch_sizes=(2,), shardshuffle=False,
                        num_workers=0, max_bad_fraction=0.5)
    batches = DiTBatches(cfg, seed=0)
    with pytest.warns(BadSampleWarning, match=r"expected \(C, t, h, w\) with \(t, h, w\) = \(2, 2, 2\)"):
        got = take(batches, 2)
    assert [b["keys"] for b in got] == [["k0", "k1"], ["k3", "k0"]]  # k2 skipped; the next good one fills in
    assert batches.metrics()["data_bad_samples"] == 1


def test_posterior_sample_uses_the_generator_and_the_variance() -> None:
    mean, logvar = torch.randn(2, 16, 2, 4, 4), torch.full((2, 16, 2, 4, 4), -2.0)
    a = sample_posterior(mean, logvar, torch.Generator().manual_seed(1))
    assert torch.equal(a, sample_posterior(mean, logvar, torch.Generator().manual_seed(1)))
    assert abs(float((a - mean).std()) - float(np.exp(-1.0))) < 0.02


def test_latent_scale_is_one_over_the_std_and_a_config_value_overrides_it(vae: CausalVAE, shards: Path,
                                                                           tmp_path: Path) -> None:
    clips = [b["pixels"].float() / 127.5 - 1.0 for b in take(DiTBatches(config(shards), seed=0), 4)]
    measured = measure_latent_scale(vae, clips, seed=3)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        z = torch.cat([sample_posterior(*vae.encode_moments(x), g).flatten() for x in clips])
    assert measured["latent_scale"] == pytest.approx(1.0 / float(z.double().std(unbiased=False)), rel=1e-6)
    assert float((z * measured["latent_scale"]).std()) == pytest.approx(1.0, abs=1e-3)
    save_latent_scale(tmp_path, measured)
    assert resolve_latent_scale(0.0, tmp_path) == pytest.approx(measured["latent_scale"])
    assert resolve_latent_scale(1.15258426, tmp_path) == 1.15258426
    with pytest.raises(FileNotFoundError, match="set data.latent_scale"):
        resolve_latent_scale(0.0, tmp_path / "other")
