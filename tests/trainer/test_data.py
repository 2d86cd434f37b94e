"""Batches from bucketed WebDataset shards: decoding, bucket checks, rank split, resumable position."""
from __future__ import annotations

import dataclasses
import io
import pickle
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from catalog.shards import (
    IncompleteShardsError,
    bucket_shards,
    decode_mp4,
    file_sha256,
    manifest_is_complete,
    parse_bucket,
    read_manifest,
)
from trainer.data import (
    BucketBatches,
    DataConfig,
    DiTBatches,
    DiTDataConfig,
    PartialDataWarning,
    ShardReadError,
    bucket_for_step,
    bucket_pipeline,
    check_data,
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


# ---------------------------------------------------------------------------------------------
# Complete shard folders only; read errors name the tar
# ---------------------------------------------------------------------------------------------

BUCKETS = {"buckets": ("5x16x16", "1x16x16"), "weights": (0.5, 0.5), "batch_sizes": (2, 2)}


def killed_before_manifest(root: Path) -> Path:
    """The synthetic shard job killed (no cleanup) after its last tar, before its manifest: complete tars only."""
    script = f"""
import os
import trainer.synthetic as synthetic
synthetic.write_manifest = lambda *args: os._exit(9)  # SIGKILL-like: nothing after this line runs
synthetic.write_synthetic_shards({str(root)!r}, {{"5x16x16": list(range(7)), "1x16x16": list(range(100, 103))}},
                                 per_shard=3)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 9, proc.stderr
    return root


def test_a_killed_shard_jobs_folder_is_refused_naming_the_missing_manifest(tmp_path: Path) -> None:
    root = killed_before_manifest(tmp_path / "killed")
    assert len(bucket_shards(root, "5x16x16")) == 3 and not (root / "manifest.json").exists()
    cfg = DataConfig(root=str(root), **BUCKETS)
    want = r"shard folder .*killed is incomplete: .*killed/manifest.json is missing: the shard job did not finish.*" \
           r"1x16x16: 1 tar\(s\), 5x16x16: 3 tar\(s\).*allow_partial = true"
    with pytest.raises(IncompleteShardsError, match=want):
        BucketBatches(cfg, seed=0, rank=0, world_size=1)
    dit = DiTDataConfig(root=str(root), num_workers=0, **BUCKETS)
    with pytest.raises(IncompleteShardsError, match=want):
        check_data(dit)
    with pytest.raises(IncompleteShardsError, match=want):
        DiTBatches(dit, seed=0)
    # Told to, the trainer reads what is there, and says so.
    with pytest.warns(PartialDataWarning, match="manifest.json is missing"):
        batches = BucketBatches(dataclasses.replace(cfg, allow_partial=True), seed=0, rank=0, world_size=1)
    assert {b for b, _ in (batches.batch(s) for s in range(1, 5))} <= {"5x16x16", "1x16x16"}
    with pytest.warns(PartialDataWarning):
        assert check_data(dataclasses.replace(dit, allow_partial=True)) == {"5x16x16": 7, "1x16x16": 3}


def _copy(shards: Path, dest: Path) -> Path:
    shutil.copytree(shards, dest)
    return dest


def test_a_manifest_listing_a_missing_or_resized_tar_is_refused_naming_it(shards: Path, tmp_path: Path) -> None:
    root = _copy(shards, tmp_path / "gone")
    (root / "5x16x16" / "shard-000001.tar").unlink()
    cfg = DataConfig(root=str(root), **BUCKETS)
    with pytest.raises(IncompleteShardsError,
                       match=r"shard 5x16x16/shard-000001.tar: listed in the manifest \(3 samples\), missing on disk"):
        BucketBatches(cfg, seed=0, rank=0, world_size=1)
    root = _copy(shards, tmp_path / "cut")
    tar = root / "5x16x16" / "shard-000002.tar"
    size = tar.stat().st_size
    tar.write_bytes(tar.read_bytes()[: size // 2])
    with pytest.raises(IncompleteShardsError, match=rf"shard 5x16x16/shard-000002.tar: {size // 2} bytes on disk, "
                                                    rf"the manifest says {size}"):
        check_data(DiTDataConfig(root=str(root), num_workers=0, **BUCKETS))
    with pytest.raises(IncompleteShardsError, match=r"bucket 9x16x16: not in .*manifest.json"):
        DiTBatches(DiTDataConfig(root=str(shards), num_workers=0, buckets=("9x16x16",), weights=(1.0,),
                                 batch_sizes=(1,)), seed=0)
    held = DataConfig(heldout_root=str(tmp_path / "gone"), heldout_bucket="5x16x16")
    with pytest.raises(IncompleteShardsError, match="shard-000001.tar: listed in the manifest"):
        heldout_clips(held, rank=0, world_size=1)


def test_the_manifest_lists_what_the_reader_reads(shards: Path, tmp_path: Path) -> None:
    root = _copy(shards, tmp_path / "extra")
    shutil.copy(root / "5x16x16" / "shard-000000.tar", root / "5x16x16" / "shard-000009.tar")
    with pytest.raises(IncompleteShardsError, match=r"tars the manifest does not list: \['5x16x16/shard-000009.tar'\]"):
        BucketBatches(DataConfig(root=str(root), **BUCKETS), seed=0, rank=0, world_size=1)
    manifest = read_manifest(shards)
    for entry in manifest["buckets"].values():
        for s in entry["shards"]:
            assert s["sha256"] == file_sha256(shards / s["shard"]) and s["bytes"] == (shards / s["shard"]).stat().st_size


def test_a_truncated_tar_read_in_training_names_the_shard_and_the_read_error(shards: Path, tmp_path: Path) -> None:
    root = _copy(shards, tmp_path / "cut")
    tar = root / "5x16x16" / "shard-000000.tar"
    size = tar.stat().st_size
    tar.write_bytes(tar.read_bytes()[: size // 2 + 100])
    want = (rf"shard {tar} \({size // 2 + 100} bytes on disk, its manifest says {size}: truncated or rewritten\): "
            r"ReadError: unexpected end of data$")
    with pytest.warns(PartialDataWarning):
        batches = BucketBatches(DataConfig(root=str(root), buckets=("5x16x16",), weights=(1.0,), batch_sizes=(3,),
                                           shardshuffle=False, allow_partial=True), seed=0, rank=0, world_size=1)
    with pytest.raises(ShardReadError, match=want) as caught:
        for step in range(1, 5):
            batches.batch(step)
    # It survives the trip from a DataLoader worker or a Ray Train worker (webdataset's own error held the file).
    again = pickle.loads(pickle.dumps(caught.value))
    assert str(again) == str(caught.value)
    # The DiT loader, through a DataLoader worker process, stops with the same message.
    with pytest.warns(PartialDataWarning):
        dit = DiTBatches(DiTDataConfig(root=str(root), buckets=("5x16x16",), weights=(1.0,), batch_sizes=(3,),
                                       shardshuffle=False, num_workers=1, allow_partial=True), seed=0)
    with pytest.raises(ShardReadError, match=want[:-1]):
        for _, _ in zip(range(4), dit, strict=False):
            pass
