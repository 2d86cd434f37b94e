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
    Bucket,
    BucketTarWriter,
    IncompleteShardsError,
    bucket_shards,
    decode_mp4,
    file_sha256,
    make_manifest,
    manifest_is_complete,
    missing_pieces,
    parse_bucket,
    read_manifest,
    write_manifest,
)
from trainer.data import (
    BadDataError,
    BadSampleWarning,
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
from trainer.synthetic import encode_mp4, synthetic_clip, synthetic_files, write_synthetic_shards


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


# ---------------------------------------------------------------------------------------------
# Bad samples: one budget for both loaders; a tar cut short by a corrupt header
# ---------------------------------------------------------------------------------------------

ONE = {"buckets": ("5x16x16",), "weights": (1.0,), "batch_sizes": (2,), "shardshuffle": False}


def garbage_member_shards(root: Path, garbage: int = 2, n: int = 8) -> Path:
    """Bucket 5x16x16 of ``n`` samples in tars of 4 (manifest included); sample ``garbage``'s mp4 member is
    bytes that are no video."""
    writer = BucketTarWriter(root, "5x16x16", maxcount=4, maxsize=2**62)
    for i in range(n):
        files = synthetic_files(i, "5x16x16")
        if i == garbage:
            files["mp4"] = b"\x00\x01 this is not an mp4" * 20
        writer.write(f"clip{i:04d}", files)
    write_manifest(root, make_manifest(writer.close(), {"5x16x16": Bucket(5, 16, 16, 8.0)}))
    return root


def test_vae_loader_skips_bad_samples_within_the_budget_and_counts_them(tmp_path: Path) -> None:
    root = garbage_member_shards(tmp_path / "bad")
    batches = BucketBatches(DataConfig(root=str(root), max_bad_samples=1, **ONE), seed=0, rank=0, world_size=1)
    with pytest.warns(BadSampleWarning, match=r"sample clip0002 in shard .*shard-000000\.tar: InvalidDataError") as w:
        got = [batches.batch(step)[1] for step in range(1, 5)]  # one epoch: 8 samples
    assert len([x for x in w if x.category is BadSampleWarning]) == 1
    assert all(x.shape == (2, 3, 5, 16, 16) for x in got)
    # Step 2's window is clip0002 (bad) and clip0003: the batch keeps its size with the next good one, clip0004.
    want = [decode_sample({"__key__": str(i), "mp4": synthetic_files(i, "5x16x16")["mp4"]}, "5x16x16") for i in (3, 4)]
    torch.testing.assert_close(got[1], torch.stack(want))
    torch.testing.assert_close(got[2][0], want[1])  # and clip0004 again in its own window
    assert batches.metrics() == {"data_samples_read": 8.0, "data_bad_samples": 1.0, "data_bad_fraction": 0.125}
    assert batches.budget.state_dict()["bad_by_shard"] == {str(root / "5x16x16" / "shard-000000.tar"): 1}
    # The count is resumable state: a resumed loader continues it, and the next epoch's clip0002 is over budget.
    resumed = BucketBatches(DataConfig(root=str(root), max_bad_samples=1, **ONE), seed=0, rank=0, world_size=1,
                            position=dict(batches.position), budget=batches.budget.state_dict())
    with pytest.warns(BadSampleWarning), pytest.raises(BadDataError, match="2 bad sample"):
        for step in range(5, 9):
            resumed.batch(step)


def test_vae_loader_over_the_budget_stops_naming_the_shard_and_the_decoders_error(tmp_path: Path) -> None:
    root = garbage_member_shards(tmp_path / "bad")
    batches = BucketBatches(DataConfig(root=str(root), max_bad_samples=0, **ONE), seed=0, rank=0, world_size=1)
    batches.batch(1)
    want = (r"^1 bad sample\(s\) skipped of 4 read, over the budget of max_bad_samples 0 \(stop at the first\); "
            rf"last: sample clip0002 in shard {root}/5x16x16/shard-000000\.tar: InvalidDataError: .*Invalid data")
    with pytest.warns(BadSampleWarning), pytest.raises(BadDataError, match=want) as caught:
        batches.batch(2)
    assert isinstance(caught.value, ShardReadError)  # jobs.train reports it as one line
    assert str(pickle.loads(pickle.dumps(caught.value))) == str(caught.value)
    # The DiT loader has the same budget (one implementation): through a DataLoader worker, the same error.
    dit = DiTBatches(DiTDataConfig(root=str(root), max_bad_samples=0, num_workers=1, **ONE), seed=0)
    with pytest.raises(BadDataError, match=want):
        for _ in zip(range(2), dit, strict=False):
            pass
    with pytest.raises(ValueError, match="max_bad_samples: expected >= 0"):
        DataConfig(max_bad_samples=-1)


def corrupt_header(tar: Path, sample: int) -> None:
    """Overwrite the tar header of sample ``sample``'s first member with garbage, keeping the file's size."""
    with tarfile.open(tar) as t:
        member = [m for m in t.getmembers() if m.isfile()][sample * 3]  # 3 members (mp4, txt, json) per sample
    data = bytearray(tar.read_bytes())
    data[member.offset:member.offset + 512] = b"\xab" * 512
    tar.write_bytes(bytes(data))


def test_a_tar_cut_short_by_a_corrupt_header_is_counted_against_its_manifest(shards: Path, tmp_path: Path) -> None:
    root = _copy(shards, tmp_path / "hdr")
    tar = root / "5x16x16" / "shard-000000.tar"  # 3 samples
    corrupt_header(tar, 1)
    # Python's tarfile takes the bad header for the end of the archive: no error, 1 of its 3 samples.
    with tarfile.open(tar) as t:
        assert len(t.getmembers()) == 3
    cfg = DataConfig(root=str(root), **(ONE | {"batch_sizes": (1,)}))
    size = tar.stat().st_size
    assert missing_pieces(root) == []  # the size is as the manifest says: only reading the tar shows it
    want = (rf"shard {tar} \({size} bytes as its manifest says, but its sha256 differs: the tar is corrupt\): "
            r"its manifest lists 3 samples, the reader got 1 \(a corrupt tar header ends the tar early\)")
    stopping = BucketBatches(dataclasses.replace(cfg, max_bad_samples=0), seed=0, rank=0, world_size=1)
    stopping.batch(1)
    with pytest.warns(BadSampleWarning), pytest.raises(BadDataError, match=want):
        stopping.batch(2)
    # Within the budget the two missing samples count as bad ones; the epoch keeps the manifest's 10 positions.
    skipping = BucketBatches(dataclasses.replace(cfg, max_bad_samples=2), seed=0, rank=0, world_size=1)
    with pytest.warns(BadSampleWarning, match=want):
        for step in range(1, 11):
            skipping.batch(step)
    assert skipping.metrics()["data_bad_samples"] == 2 and skipping.metrics()["data_samples_read"] == 10
    # The DiT loader and the held-out clips read through the same check.
    dit = DiTBatches(DiTDataConfig(root=str(root), max_bad_samples=0, num_workers=0, **(ONE | {"batch_sizes": (1,)})),
                     seed=0)
    with pytest.warns(BadSampleWarning), pytest.raises(BadDataError, match=want):
        for _ in zip(range(3), dit, strict=False):
            pass
    with pytest.raises(ShardReadError, match=want):
        heldout_clips(DataConfig(heldout_root=str(root), heldout_bucket="5x16x16", heldout_samples=10),
                      rank=0, world_size=1)
