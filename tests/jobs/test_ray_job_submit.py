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


def _smoke_config(path: Path) -> Path:
    """The shipped jobs/configs/end_to_end.toml with every training stage cut to 2 steps and the sampler to 2 DDIM
    steps: the whole chain (curate to report) on the built-in sample in a couple of minutes."""
    import tomllib

    from jobs.end_to_end import DEFAULT_CONFIG, TRAIN_STEPS, dump_toml

    cfg = tomllib.loads(DEFAULT_CONFIG.read_text())
    for stage in TRAIN_STEPS:
        train = cfg[stage]["train"]
        train["steps"] = 2
        for key in ("eval_every", "ckpt_every", "recon_every", "sample_every"):
            if key in train:
                train[key] = 2
        train["log_every"] = 1
        cfg[stage]["optim"]["warmup_steps"] = 1  # a cosine schedule's warm-up must end before the last step
        if "sample" in cfg[stage]:
            cfg[stage]["sample"]["steps"] = 2
    cfg["sample"]["steps"] = 2
    path.write_text(dump_toml(cfg))
    return path


def test_ray_job_submit_runs_the_end_to_end_job(tmp_path, submit_job):
    """`ray job submit -- python -m jobs.end_to_end` against a real head: every step runs in the submitted driver on
    the head's cluster (no in-process Ray), and the run folder holds what the job promises."""
    import json

    from catalog.db import open_catalog
    from jobs.end_to_end import STEPS, TRAIN_STEPS
    from trainer.checkpoint import checkpoint_step, latest_checkpoint

    out = tmp_path / "run"
    cfg = _smoke_config(tmp_path / "end_to_end.toml")
    sub = submit_job("python", "-m", "jobs.end_to_end", "--output", str(out), "--config", str(cfg), timeout=900)
    text = sub.stdout + sub.stderr
    assert sub.returncode == 0, text[-6000:]
    assert "ray: connected to" in text and "in-process cluster" not in text  # it joined the head it was sent to
    for i, step in enumerate(STEPS, 1):
        assert f"[end_to_end] {i}/{len(STEPS)} {step}: done in" in text, text[-6000:]
    for stage in TRAIN_STEPS:
        assert checkpoint_step(latest_checkpoint(out / "runs" / stage)) == 2
    hq = latest_checkpoint(out / "runs" / "dit_hq")
    assert json.loads((hq / "lineage.json").read_text())["selection"]["rows"] > 0
    con = open_catalog(out / "curate" / "catalog.duckdb", read_only=True)
    try:
        runs = con.execute("SELECT run, count(DISTINCT clip_id) FROM checkpoints JOIN checkpoint_clips "
                           "USING (checkpoint) GROUP BY ALL ORDER BY 1").fetchall()
    finally:
        con.close()
    assert [r[0] for r in runs] == sorted(TRAIN_STEPS) and all(n > 0 for _, n in runs)
    assert list((out / "samples").glob("*.mp4")) and (out / "export" / "diffusers" / "transformer" / "config.json").is_file()
    assert "data:image/png;base64," in (out / "training.html").read_text()
