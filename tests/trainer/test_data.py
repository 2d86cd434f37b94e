"""Batches from bucketed WebDataset shards: decoding, bucket checks, rank split, resumable position."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from catalog.shards import bucket_shards, decode_mp4, manifest_is_complete, parse_bucket, read_manifest
from trainer.data import (
    BucketBatches,
    DataConfig,
    bucket_for_step,
    bucket_pipeline,
    decode_sample,
    heldout_clips,
)
from trainer.synthetic import encode_mp4, synthetic_clip, write_synthetic_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    return write_synthetic_shards(root, {"5x16x16": list(range(10)), "1x16x16": list(range(100, 106))}, per_shard=3)


def test_parse_bucket() -> None:
    assert parse_bucket("17x256x256") == (17, 256, 256)
    with pytest.raises(ValueError, match="frames x height x width"):
        parse_bucket("17x256")


def test_decode_video_returns_every_frame_close_to_the_source() -> None:
    clip = synthetic_clip(0, 17, 32, 48)
    frames = decode_mp4(encode_mp4(clip))
    assert frames.shape == (17, 32, 48, 3) and frames.dtype == np.uint8
    assert np.abs(frames.astype(int) - clip).mean() < 4  # H.264 at crf 12 on smooth content


def test_decode_sample_rejects_a_sample_of_the_wrong_shape() -> None:
    sample = {"__key__": "k", "mp4": encode_mp4(synthetic_clip(0, 5, 16, 16))}
    assert decode_sample(sample, "5x16x16").shape == (3, 5, 16, 16)
    with pytest.raises(ValueError, match=r"expected \(9, 16, 16\)"):
        decode_sample(sample, "9x16x16")
    with pytest.raises(KeyError, match="'mp4' or 'jpg'"):
        decode_sample({"__key__": "k", "txt": b"x"}, "5x16x16")


def test_bucket_shards_follow_the_layout(shards: Path) -> None:
    urls = bucket_shards(shards, "5x16x16")
    assert [Path(u).name for u in urls] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar", "shard-000003.tar"]
    with tarfile.open(urls[0]) as tar:
        assert sorted(n.rsplit(".", 1)[1] for n in tar.getnames())[:3] == ["json", "json", "json"]
    with pytest.raises(FileNotFoundError, match="17x16x16"):
        bucket_shards(shards, "17x16x16")


def test_ranks_split_samples_without_overlap(shards: Path) -> None:
    urls = bucket_shards(shards, "5x16x16")
    seen = []
    for rank in range(2):
        pipe = bucket_pipeline(urls, "5x16x16", batch_size=1, seed=0, shardshuffle=False, rank=rank, world_size=2)
        it = iter(pipe)
        seen.append([next(it)[0] for _ in range(5)])  # one epoch: 10 samples over 2 ranks
    flat = [x for rank in seen for x in rank]
    for i in range(len(flat)):
        for j in range(i + 1, len(flat)):
            assert not torch.equal(flat[i], flat[j]), "a sample went to two ranks in one epoch"


def test_bucket_choice_is_a_function_of_seed_and_step() -> None:
    weights = (0.8, 0.2)
    draws = [bucket_for_step(3, s, weights) for s in range(2000)]
    assert draws == [bucket_for_step(3, s, weights) for s in range(2000)]
    assert 0.75 < draws.count(0) / len(draws) < 0.85


def test_resumed_position_continues_the_same_batches(shards: Path) -> None:
    cfg = DataConfig(root=str(shards), buckets=("5x16x16", "1x16x16"), weights=(0.6, 0.4), batch_sizes=(2, 3))
    straight = BucketBatches(cfg, seed=1, rank=0, world_size=1)
    batches = [straight.batch(step) for step in range(1, 13)]
    assert {b for b, _ in batches} == {"5x16x16", "1x16x16"}
    assert all(x.shape == ((2, 3, 5, 16, 16) if b == "5x16x16" else (3, 3, 1, 16, 16)) for b, x in batches)

    first = BucketBatches(cfg, seed=1, rank=0, world_size=1)
    for step in range(1, 8):
        first.batch(step)
    resumed = BucketBatches(cfg, seed=1, rank=0, world_size=1, position=dict(first.position))
    for step in range(8, 13):
        bucket, x = resumed.batch(step)
        assert bucket == batches[step - 1][0]
        torch.testing.assert_close(x, batches[step - 1][1])


def test_heldout_clips_are_split_across_ranks(shards: Path) -> None:
    cfg = DataConfig(heldout_root=str(shards), heldout_bucket="5x16x16", heldout_samples=5)
    r0 = heldout_clips(cfg, rank=0, world_size=2)
    r1 = heldout_clips(cfg, rank=1, world_size=2)
    assert (len(r0), len(r1)) == (3, 2)
    assert heldout_clips(DataConfig(), rank=0, world_size=1) == []


def test_config_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="same length"):
        DataConfig(buckets=("5x16x16",), weights=(1.0, 1.0), batch_sizes=(1,))
    with pytest.raises(ValueError, match="heldout_bucket"):
        DataConfig(heldout_root="x")


def test_image_samples_decode_as_one_frame(shards: Path) -> None:
    urls = bucket_shards(shards, "1x16x16")
    with tarfile.open(urls[0]) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".jpg"))
        data = tar.extractfile(member).read()
    x = decode_sample({"__key__": "img", "jpg": data}, "1x16x16")
    assert x.shape == (3, 1, 16, 16) and -1 <= x.min() and x.max() <= 1
    assert io.BytesIO(data).read(2) == b"\xff\xd8"


def test_synthetic_shards_are_in_the_one_shard_format(shards: Path) -> None:
    manifest = read_manifest(shards)  # checked against the format the pipeline's writer uses too
    assert manifest["source"] == "synthetic" and manifest["samples"] == 16 and manifest["shards"] == 6
    assert {b: (e["samples"], len(e["shards"])) for b, e in manifest["buckets"].items()} == {
        "5x16x16": (10, 4), "1x16x16": (6, 2)}
    assert manifest_is_complete(manifest, shards)
    with pytest.raises(ValueError, match=r"4k\+1 frames"):
        DataConfig(buckets=("16x16x16",), weights=(1.0,), batch_sizes=(1,))
