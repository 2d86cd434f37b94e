"""python -m jobs.shards with ``[buckets] strides``: the same clip written at several frame rates (CogVideo's
multi-frame-rate training), each sample's json carrying its own fps and stride, and the DiT loader reading that fps.

A separate module from test_shards_job.py so its catalog and config stay apart (one in-process Ray start).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from catalog.db import register_run
from catalog.shards import decode_mp4, read_manifest, sample_key
from jobs import shards as job
from trainer.data import decode_dit_sample

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/shard_fixtures.py, shared by the shard tests
from shard_fixtures import centre_code, code, make_library, write_run

# land.mp4 (12 fps, 25-frame clips) fills 17 frames at 8 fps and 9 at 4 fps (stride 2); portrait.mp4 (30 fps, 60
# frames) and wide.mp4 (24 fps, 48) fill 9 at 8 fps but only 8 at 4 fps, so they get no stride-2 sample.
CONFIG = """
[buckets]
frames = [1, 9, 17]
fps = 8.0
resolutions = ["128x128", "96x160", "160x96", "64x192", "48x144"]
strides = { "9" = [1, 2], "17" = [1, 2] }

[shards]
preset = "ultrafast"

[ray]
task_cpus = 0.5
in_flight = 4
"""


@pytest.mark.slow  # an in-process Ray start: ~24 s here
def test_job_writes_each_configured_stride_with_its_fps(tmp_path, capsys):
    videos, clips = make_library(tmp_path / "raw")
    db = tmp_path / "catalog.duckdb"
    register_run(db, write_run(tmp_path / "run", videos, clips))
    (tmp_path / "shards.toml").write_text(CONFIG)
    out = tmp_path / "shards"
    assert job.main(["--catalog", str(db), "--output", str(out), "--config", str(tmp_path / "shards.toml")]) == 0
    assert "17x96x160 (8 fps at strides 1, 2)" in capsys.readouterr().out

    samples = list(wds.WebDataset(sorted(str(p) for p in out.glob("*/shard-*.tar")), shardshuffle=False))
    by = {}
    for s in samples:
        meta = json.loads(s["json"])
        assert s["__key__"] == sample_key(meta["clip_id"], meta["stride"])
        by[(meta["clip_id"], meta["stride"])] = (s, meta)
    assert len(by) == len(samples)  # distinct keys: one sample per clip and stride
    land = sorted(c for c, st in by if st == 2)
    # Of the kept clips, only land.mp4's two are long enough at 4 fps.
    assert land == sorted({c for c, _ in by if c.startswith(videos[0]["video_id"])}) and len(land) == 2
    manifest = read_manifest(out)
    assert sorted((s["clip_id"], s["stride"]) for s in manifest["stride_skips"]) == sorted(
        (c, 2) for c, st in by if st == 1 and by[(c, 1)][1]["bucket"].startswith("9x"))
    assert manifest["buckets"]["9x96x160"]["fps"] == 8.0  # the bucket's base rate; each sample's own is in its json

    (s1, m1), (s2, m2) = by[(land[0], 1)], by[(land[0], 2)]
    assert (m1["bucket"], m1["fps"], m1["stride"]) == ("17x96x160", 8.0, 1)
    assert (m2["bucket"], m2["fps"], m2["stride"]) == ("9x96x160", 4.0, 2)
    assert m2["source_frames"] == m1["source_frames"][::2]
    f1, f2 = decode_mp4(s1["mp4"]), decode_mp4(s2["mp4"])  # real decodes of the written members
    assert f1.shape == (17, 96, 160, 3) and f2.shape == (9, 96, 160, 3)
    # Stride-2 frame i is stride-1 frame 2i (two lossy encodes of one source frame), not its neighbour 2i+1.
    diff = np.abs(f2.astype(np.int16) - f1[::2].astype(np.int16)).mean(axis=(1, 2, 3))
    assert diff.max() < 1.5, diff
    for i in range(9):
        assert abs(centre_code(f2[i]) - code(m2["source_frames"][i])) < 4
        if i < 8:
            assert abs(centre_code(f2[i]) - centre_code(f1[2 * i + 1])) > 6

    # The DiT loader hands each sample's own rate to fps conditioning.
    assert decode_dit_sample(s2, m2["bucket"])["fps"] == 4.0 and decode_dit_sample(s1, m1["bucket"])["fps"] == 8.0
