"""A real Ray head on loopback, the curation job submitted with `ray job submit`, tables read back."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray(*args: str, env: dict, timeout: float) -> subprocess.CompletedProcess:
    exe = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
    return subprocess.run([exe, *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_ray_job_submit_curates_into_tables(tmp_path):
    from pipeline.sample import generate_sample

    raw = tmp_path / "raw"
    generate_sample(raw)
    out = tmp_path / "out"
    port, dash = _free_port(), _free_port()
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    tmp_ray = Path("/tmp") / f"rayt{os.getpid()}"  # Ray's socket paths must stay short
    started = _ray("start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                   "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=2",
                   "--include-dashboard=true", f"--temp-dir={tmp_ray}", "--disable-usage-stats",
                   env=env, timeout=180)
    assert started.returncode == 0, started.stderr[-3000:]
    try:
        sub = _ray("job", "submit", f"--address=http://127.0.0.1:{dash}", "--working-dir", str(REPO),
                   "--", "python", "-m", "jobs.curate", "--input", str(raw), "--output", str(out),
                   env=env, timeout=900)
        assert sub.returncode == 0, (sub.stdout + sub.stderr)[-5000:]
        assert "succeeded" in (sub.stdout + sub.stderr).lower()
    finally:
        _ray("stop", "--force", env=env, timeout=120)
        shutil.rmtree(tmp_ray, ignore_errors=True)

    videos = pq.read_table(out / "videos.parquet").to_pylist()
    clips = pq.read_table(out / "clips.parquet").to_pylist()
    inputs = sorted(p.name for p in raw.iterdir() if p.suffix in (".mp4", ".jpg"))
    assert sorted(Path(v["uri"]).name for v in videos) == inputs
    assert clips and all(c["video_id"] in {v["video_id"] for v in videos} for c in clips)
    kept = [c for c in clips if not c["reject_reasons"]]
    assert kept and all(c["caption"] for c in kept)
    assert (out / "catalog.duckdb").exists()
