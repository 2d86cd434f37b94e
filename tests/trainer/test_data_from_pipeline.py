"""Shards written by the pipeline's writer from a real catalog (the built-in sample, curated once per
session) and read back through the trainer's loader: the one shard contract seen from both sides."""
from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from catalog.config import load_section
from catalog.shard_index import register_output, select_clips
from catalog.shards import CAPTION_KEY, META_KEY, Bucket, bucket_shards, parse_bucket, read_manifest
from pipeline.buckets import BucketConfig
from pipeline.shards import SCORE_COLUMNS, ShardConfig, build_shards, crop_resize
from trainer.data import BucketBatches, DataConfig, bucket_pipeline, decode_sample, to_uint8

pytestmark = pytest.mark.slow  # the session's sample curation (~45 s) is shared with every test that needs it

REPO = Path(__file__).resolve().parents[2]
JOB_CONFIG = REPO / "jobs" / "configs" / "shards.toml"
WHERE = "true"


# What jobs.shards does for one selection, rendered in-process: the shipped config, every kept clip.
# A script, so the byte-identity test can run it again in a fresh process.
BUILD = """
import sys
from pathlib import Path
from catalog.config import load_section
from catalog.shard_index import select_clips
from pipeline.buckets import BucketConfig
from pipeline.shards import ShardConfig, build_shards
db, out, where, config = sys.argv[1:]
build_shards(select_clips(db, where), Path(out), where=where, buckets=load_section(BucketConfig, config, "buckets"),
             shards=load_section(ShardConfig, config, "shards"))
"""


def _build(db: Path, out: Path):
    return build_shards(select_clips(db, WHERE), out, where=WHERE,
                        buckets=load_section(BucketConfig, JOB_CONFIG, "buckets"),
                        shards=load_section(ShardConfig, JOB_CONFIG, "shards"))


@pytest.fixture(scope="module")
def built(sample_curation: Path, tmp_path_factory) -> dict:
    db = sample_curation / "catalog.duckdb"
    out = tmp_path_factory.mktemp("sample_shards") / "shards"
    result = _build(db, out)
    register_output(db, out)
    rows = {r["clip_id"]: r for r in select_clips(db, WHERE)}
    return {"db": db, "out": out, "result": result, "rows": rows}


def _raw_samples(out: Path, bucket: str) -> list[dict]:
    return list(wds.WebDataset(bucket_shards(out, bucket), shardshuffle=False))


def test_every_kept_clip_became_a_sample_in_video_and_image_buckets(built):
    manifest = read_manifest(built["out"])
    assert manifest == built["result"].manifest and built["result"].errors == []
    assert manifest["skipped"] == [] and manifest["samples"] == len(built["rows"]) >= 5
    names = sorted(manifest["buckets"])
    assert any(parse_bucket(b)[0] == 1 for b in names) and any(parse_bucket(b)[0] > 1 for b in names)


def test_trainer_batches_have_the_exact_bucket_shape_and_cover_every_sample(built):
    manifest = read_manifest(built["out"])
    for bucket, entry in manifest["buckets"].items():
        f, h, w = parse_bucket(bucket)
        pipe = bucket_pipeline(bucket_shards(built["out"], bucket), bucket, batch_size=1, seed=0, shardshuffle=False)
        epoch = [x for x in itertools.islice(iter(pipe), entry["samples"])]  # the stream is endless: one epoch
        assert all(x.shape == (1, 3, f, h, w) and x.dtype == torch.float32 for x in epoch)
        assert all(-1.0 <= float(x.min()) and float(x.max()) <= 1.0 for x in epoch)
        raw = _raw_samples(built["out"], bucket)
        assert len(raw) == entry["samples"]
        for x, sample in zip(epoch, raw):  # the batches are the samples, in tar order
            assert torch.equal(x[0], decode_sample(sample, bucket))

    # The mixed-bucket sampler the VAE stage uses, over every bucket the pipeline wrote.
    buckets = tuple(sorted(manifest["buckets"]))
    cfg = DataConfig(root=str(built["out"]), buckets=buckets, weights=(1.0,) * len(buckets),
                     batch_sizes=(1,) * len(buckets), shardshuffle=False)
    batches = BucketBatches(cfg, seed=0, rank=0, world_size=1)
    for step in range(6):
        bucket, x = batches.batch(step)
        assert x.shape == (1, 3, *parse_bucket(bucket))


def test_captions_and_json_fields_equal_the_catalog_rows(built):
    rows = built["rows"]
    seen = set()
    for bucket in read_manifest(built["out"])["buckets"]:
        for sample in _raw_samples(built["out"], bucket):
            meta = json.loads(sample[META_KEY])
            row = rows[meta["clip_id"]]
            seen.add(meta["clip_id"])
            assert sample[CAPTION_KEY].decode() == row["caption"]
            assert meta["video_id"] == row["video_id"] and meta["source_uri"] == row["video_uri"]
            assert meta["span"] == {k: row[k] for k in ("start_frame", "end_frame", "start_s", "end_s")}
            assert meta["source_fps"] == row["fps"] and meta["caption_model"] == row["caption_model"]
            assert meta["scores"] == {k: row[k] for k in SCORE_COLUMNS}
            f, h, w = parse_bucket(bucket)
            assert (meta["bucket"], meta["frames"]) == (bucket, f)
            assert meta["source_frames"][0] == row["start_frame"] and len(meta["source_frames"]) == f
            assert all(row["start_frame"] <= i < max(row["end_frame"], row["start_frame"] + 1)
                       for i in meta["source_frames"])
    assert seen == set(rows)


def test_trainer_pixels_are_the_catalog_clip_frames(built):
    """Each tensor the trainer decodes is the clip's own source frames, cropped and resized (not another clip)."""
    import av

    rows = built["rows"]
    for bucket in read_manifest(built["out"])["buckets"]:
        for sample in _raw_samples(built["out"], bucket):
            meta = json.loads(sample[META_KEY])
            uri = rows[meta["clip_id"]]["video_uri"]
            with av.open(uri) as container:
                source = np.stack([fr.to_ndarray(format="rgb24") for fr in container.decode(video=0)])
            expected = crop_resize(source[meta["source_frames"]], Bucket(*parse_bucket(bucket), meta["fps"]))
            got = to_uint8(decode_sample(sample, bucket))  # (F, H, W, 3)
            error = np.abs(got.astype(int) - expected.astype(int)).mean()
            assert error < 6, (meta["clip_id"], error)
            other = np.roll(expected, 1, axis=0) if len(expected) > 1 else expected[:, ::-1]
            assert np.abs(got.astype(int) - other.astype(int)).mean() > error  # the check tells frames apart


def test_rebuilding_in_another_process_gives_byte_identical_tars(built, tmp_path):
    again = tmp_path / "again"
    proc = subprocess.run([sys.executable, "-c", BUILD, str(built["db"]), str(again), WHERE, str(JOB_CONFIG)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = sorted(p.relative_to(built["out"]) for p in built["out"].rglob("*") if p.is_file())
    second = sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert first == second and any(str(p).endswith(".tar") for p in first)
    for rel in first:
        assert (again / rel).read_bytes() == (built["out"] / rel).read_bytes(), rel
