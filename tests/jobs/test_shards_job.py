"""python -m jobs.shards end to end: catalog in, tars and catalog rows out, on in-process Ray and on a real head."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import webdataset as wds

from catalog.db import open_catalog, register_run
from jobs import shards as job
from catalog.shards import decode_jpg, decode_mp4

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/shard_fixtures.py, shared by the shard tests
from shard_fixtures import make_library, write_run

REPO = Path(__file__).resolve().parents[2]
# Small buckets and a fast preset keep the job quick; same sections as jobs/configs/shards.toml.
CONFIG = """
[buckets]
frames = [1, 9, 17]
fps = 8.0
resolutions = ["128x128", "96x160", "160x96", "64x192", "48x144"]

[shards]
maxcount = 2
preset = "ultrafast"

[ray]
task_cpus = 0.5
in_flight = 4
"""


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("job")
    videos, clips = make_library(root / "raw")
    register_run(root / "catalog.duckdb", write_run(root / "run", videos, clips))
    (root / "shards.toml").write_text(CONFIG)
    return root / "catalog.duckdb"


def _rows(db: Path, sql: str, params: list | None = None) -> list[tuple]:
    con = open_catalog(db, read_only=True)
    try:
        return con.execute(sql, params or []).fetchall()
    finally:
        con.close()


def _check_output(db: Path, out: Path, where: str) -> int:
    samples = list(wds.WebDataset(sorted(str(p) for p in out.glob("*/shard-*.tar")), shardshuffle=False))
    kept = dict(_rows(db, f"SELECT clip_id, caption FROM kept_clips WHERE {where}"))
    assert samples
    for s in samples:
        meta = json.loads(s["json"])
        f, h, w = (int(x) for x in meta["bucket"].split("x"))
        frames = decode_jpg(s["jpg"]) if "jpg" in s else decode_mp4(s["mp4"])
        assert frames.shape == (f, h, w, 3)
        assert s["txt"].decode() == kept[meta["clip_id"]]
    assert _rows(db, "SELECT count(*) FROM shard_samples WHERE output = ?", [str(out.resolve())])[0][0] == len(samples)
    assert not list(out.rglob("*.tmp"))
    return len(samples)


def test_job_in_process_then_rerun_is_a_no_op(catalog, tmp_path, capsys):
    out = tmp_path / "shards"
    where = "aesthetic_mean >= 5.0"
    argv = ["--catalog", str(catalog), "--where", where, "--output", str(out),
            "--config", str(catalog.parent / "shards.toml")]
    assert job.main(argv) == 0
    printed = capsys.readouterr().out
    assert "shards: wrote" in printed and "clips fit no bucket" in printed and "ray: in-process cluster" in printed
    n = _check_output(catalog, out, where)
    assert n == len(_rows(catalog, f"SELECT 1 FROM kept_clips WHERE {where}")) - 1  # tiny.mp4 fits no bucket

    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert job.main(argv) == 0
    printed = capsys.readouterr().out
    assert "shards: unchanged" in printed and "catalog: already had" in printed
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    assert _rows(catalog, "SELECT count(*) FROM shard_samples WHERE output = ?", [str(out.resolve())])[0][0] == n


def test_limit_writes_only_the_first_clips(catalog, tmp_path, capsys):
    out = tmp_path / "shards"
    assert job.main(["--catalog", str(catalog), "--where", "true", "--output", str(out), "--limit", "3",
                     "--config", str(catalog.parent / "shards.toml")]) == 0
    printed = capsys.readouterr().out
    first = [r[0] for r in _rows(catalog, "SELECT clip_id FROM kept_clips ORDER BY clip_id LIMIT 3")]
    written = [json.loads(s["json"])["clip_id"] for s in wds.WebDataset(sorted(str(p) for p in out.glob("*/shard-*.tar")),
                                                                         shardshuffle=False)]
    manifest = json.loads((out / "manifest.json").read_text())
    assert written and set(written) | {s["clip_id"] for s in manifest["skipped"]} == set(first)
    assert "(first 3 by clip_id)" in manifest["where"] and "inputs     3 selected clips" in printed


def test_where_defaults_to_every_kept_clip(catalog, tmp_path, capsys):
    """No --where selects all of kept_clips (a stricter predicate is the user's choice, not a default that can
    select nothing: stand-in aesthetic scores are ~0.15)."""
    out = tmp_path / "shards"
    assert job.main(["--catalog", str(catalog), "--output", str(out), "--dry-run",
                     "--config", str(catalog.parent / "shards.toml")]) == 0
    printed = capsys.readouterr().out
    kept = _rows(catalog, "SELECT count(*) FROM kept_clips")[0][0]
    assert kept > 0 and f"shards: {kept} kept clips match 'true'" in printed
    assert not out.exists()


def test_bad_where_exits_non_zero_with_duckdb_message(catalog, tmp_path, capsys):
    out = tmp_path / "shards"
    assert job.main(["--catalog", str(catalog), "--where", "aesthetic >= 5", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "aesthetic >= 5" in err and "Referenced column" in err and "Traceback" not in err
    assert not out.exists()


def test_unknown_config_key_is_named(catalog, tmp_path, capsys):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[buckets]\nframez = [17]\n")
    assert job.main(["--catalog", str(catalog), "--where", "true", "--output", str(tmp_path / "o"),
                     "--config", str(cfg)]) == 2
    assert "framez" in capsys.readouterr().err


def test_shipped_config_loads():
    from pipeline.buckets import BucketConfig
    from catalog.config import load_section
    from pipeline.shards import ShardConfig

    assert load_section(BucketConfig, job.DEFAULT_CONFIG, "buckets") == BucketConfig()
    assert load_section(ShardConfig, job.DEFAULT_CONFIG, "shards") == ShardConfig()
    assert load_section(job.RayConfig, job.DEFAULT_CONFIG, "ray") == job.RayConfig()


@pytest.mark.slow
def test_ray_job_submit_writes_the_same_shards(catalog, tmp_path, submit_job):
    where = "aesthetic_mean >= 5.0"
    out = tmp_path / "shards"
    sub = submit_job("python", "-m", "jobs.shards", "--catalog", str(catalog), "--where", where,
                     "--output", str(out), "--config", str(catalog.parent / "shards.toml"), timeout=600)
    assert sub.returncode == 0, (sub.stdout + sub.stderr)[-5000:]
    assert "shards: wrote" in sub.stdout
    assert "ray: connected to" in sub.stdout  # the job used the cluster it was submitted to
    _check_output(catalog, out, where)


@pytest.mark.slow
@pytest.mark.media
def test_real_footage_curate_catalog_shards(shared_media, tmp_path):
    """Real 3:1 and square photos and a portrait cut from a real clip: curate -> catalog -> shards."""
    import av
    import numpy as np

    from catalog.db import set_threshold

    raw = tmp_path / "raw"
    raw.mkdir()
    for name in ("leopard.jpg", "ice-cream.jpg"):
        (raw / name).symlink_to(shared_media / name)  # referenced where they lie, never copied
    with av.open(str(shared_media / "again.mkv")) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    with av.open(str(raw / "portrait.mp4"), "w") as out:  # 640x480 turned on its side, cropped to 360x640
        s = out.add_stream("libx264", rate=30)
        s.width, s.height, s.pix_fmt = 360, 640, "yuv420p"
        s.codec_context.thread_count = 1
        for f in frames:
            out.mux(s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(np.rot90(f)[:, 60:420]), format="rgb24")))
        out.mux(s.encode())
    # Stand-in models score at random, so their curation cut-offs are opened up (TOML has no null) and
    # their catalog thresholds switched off below; the geometry under test does not depend on them.
    (tmp_path / "curate.toml").write_text(
        "[prefilter]\nsharpness_min = 0.0\nwatermark_max = 1.0\naesthetic_min = -1000.0\n")
    cur = tmp_path / "cur"
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    run = subprocess.run([sys.executable, "-m", "jobs.curate", "--input", str(raw), "--output", str(cur),
                          "--config", str(tmp_path / "curate.toml")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, (run.stdout + run.stderr)[-5000:]
    db = cur / "catalog.duckdb"
    con = open_catalog(db)
    try:
        for name in ("watermark_max", "aesthetic_min", "caption_similarity_min"):
            set_threshold(con, name, None)
    finally:
        con.close()

    out = tmp_path / "shards"
    shards = subprocess.run([sys.executable, "-m", "jobs.shards", "--catalog", str(db), "--where", "true",
                             "--output", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert shards.returncode == 0, (shards.stdout + shards.stderr)[-5000:]
    uris = dict(_rows(db, "SELECT video_id, uri FROM videos"))
    got = {}
    for s in wds.WebDataset(sorted(str(p) for p in out.glob("*/shard-*.tar")), shardshuffle=False):
        meta = json.loads(s["json"])
        f, h, w = (int(x) for x in meta["bucket"].split("x"))
        frames = decode_jpg(s["jpg"]) if "jpg" in s else decode_mp4(s["mp4"])
        assert frames.shape == (f, h, w, 3)
        x0, y0, x1, y1 = meta["crop"]
        assert abs((x1 - x0) / (y1 - y0) - w / h) <= (w / h) / min(x1 - x0, y1 - y0)  # cropped, not stretched
        got[Path(uris[meta["video_id"]]).name] = meta["bucket"]
    assert got == {"leopard.jpg": "1x336x1024", "ice-cream.jpg": "1x592x592", "portrait.mp4": "17x336x192"}
