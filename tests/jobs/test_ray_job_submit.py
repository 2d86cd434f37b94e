"""A real Ray head on loopback (tests/jobs/conftest.py): the curation job submitted with `ray job submit`, tables read
back; relative paths refused."""
from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.slow


def test_ray_job_submit_curates_into_tables(tmp_path, submit_job):
    from pipeline.sample import generate_sample

    raw = tmp_path / "raw"
    generate_sample(raw)
    out = tmp_path / "out"
    # The head has 2 CPUs: half-CPU decode tasks fit beside the five quarter-CPU model actors.
    cfg = tmp_path / "curate.toml"
    cfg.write_text("[ray]\ntask_cpus = 0.5\n")
    sub = submit_job("python", "-m", "jobs.curate", "--input", str(raw), "--output", str(out), "--config", str(cfg))
    assert sub.returncode == 0, (sub.stdout + sub.stderr)[-5000:]
    assert "succeeded" in (sub.stdout + sub.stderr).lower()

    videos = pq.read_table(out / "videos.parquet").to_pylist()
    clips = pq.read_table(out / "clips.parquet").to_pylist()
    inputs = sorted(p.name for p in raw.iterdir() if p.suffix in (".mp4", ".jpg"))
    assert sorted(Path(v["uri"]).name for v in videos) == inputs
    assert clips and all(c["video_id"] in {v["video_id"] for v in videos} for c in clips)
    kept = [c for c in clips if not c["reject_reasons"]]
    assert kept and all(c["caption"] for c in kept)
    assert (out / "catalog.duckdb").exists()


def test_relative_paths_are_refused_under_ray_job_submit(tmp_path, submit_job):
    """Under `ray job submit` the driver's working directory is Ray's temporary copy of --working-dir, which Ray
    deletes later: a relative --output would "succeed" and lose the data, so every job refuses it."""
    curate = submit_job("python", "-m", "jobs.curate", "--input", str(tmp_path), "--output", "out/relative", timeout=600)
    shards = submit_job("python", "-m", "jobs.shards", "--catalog", str(tmp_path / "catalog.duckdb"), "--where", "true",
                        "--output", "out/shards", timeout=600)
    for sub, flag, value in ((curate, "--output", "out/relative"), (shards, "--output", "out/shards")):
        text = sub.stdout + sub.stderr
        assert sub.returncode != 0, text[-3000:]
        assert "failed" in text.lower()
        assert f"error: {flag} '{value}' is a relative path; under `ray job submit`" in text, text[-3000:]
        assert "Ray deletes after the job" in text and "Traceback" not in text
    assert not (tmp_path / "out").exists()


# `ray job submit` of jobs.end_to_end: tests/jobs/test_end_to_end.py's run is submitted to the same head.
