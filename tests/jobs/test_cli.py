"""Every `python -m jobs.*` at the console, through real subprocesses: a bad config or bad argument is one line on
stderr naming the key or flag and exit status 2 (never a traceback); --dry-run lists and touches nothing; --limit
takes the first N. None of these start Ray but the one marked slow."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/shard_fixtures.py
from shard_fixtures import make_library, write_run

REPO = Path(__file__).resolve().parents[2]


def run_job(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", **(env or {}))
    full_env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=full_env, capture_output=True, text=True,
                          timeout=300)


def assert_usage_error(proc: subprocess.CompletedProcess, *named: str) -> str:
    """Exit 2, exactly one line on stderr, naming every string in ``named``, no traceback."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in proc.stderr + proc.stdout
    for text in named:
        assert text in lines[0], (text, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> Path:
    from catalog.db import register_run

    root = tmp_path_factory.mktemp("cli")
    videos, clips = make_library(root / "raw")
    register_run(root / "catalog.duckdb", write_run(root / "run", videos, clips))
    return root / "catalog.duckdb"


def _toml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    return str(path)


# --- jobs.curate ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("toml, named", [
    ('[caption]\nbackend = "nope"\n', ["caption.backend", "'nope'", "openai"]),   # a bad value
    ("[decode]\nmax_sid = 384\n", ["[decode]", "'max_sid'"]),                    # an unknown key
    ('[ray]\nbatch_size = "8"\n', ["ray.batch_size", "expected int"]),           # a wrong type
    ("[decodr]\n", ["'decodr'"]),                                                # an unknown section
    ("[run\n", ["config"]),                                                      # not TOML
])
def test_curate_bad_config(tmp_path, toml, named):
    assert_usage_error(run_job("jobs.curate", "--config", _toml(tmp_path, toml), "--output", str(tmp_path / "o")),
                       *named)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, named", [
    (["--limit", "x"], ["--limit", "'x'"]),
    (["--limit", "0"], ["--limit", "positive"]),
    (["--bogus"], ["--bogus"]),
    (["--config", "/nonexistent/curate.toml"], ["/nonexistent/curate.toml", "does not exist"]),
])
def test_curate_bad_arguments(args, named):
    assert_usage_error(run_job("jobs.curate", *args), *named)


def test_curate_dry_run_lists_inputs_and_touches_nothing(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    for name in ("a.mp4", "b.jpg", "c.mov", "notes.txt"):
        (raw / name).write_bytes(b"not read by a dry run")
    out = tmp_path / "out"
    proc = run_job("jobs.curate", "--input", str(raw), "--output", str(out), "--dry-run", "--limit", "2")
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert f"process  {raw / 'a.mp4'}" in text and f"process  {raw / 'b.jpg'}" in text   # sorted, first 2
    assert f"skip     {raw / 'c.mov'}  (beyond --limit 2)" in text
    assert f"ignore   {raw / 'notes.txt'}" in text
    assert f"{out}/{{videos,clips,rejects,skipped,runs}}.parquet" in text
    assert "to process      2" in text and "ray:" not in text  # no cluster was started
    assert not out.exists() and sorted(p.name for p in raw.iterdir()) == ["a.mp4", "b.jpg", "c.mov", "notes.txt"]


def odd_entries(raw: Path) -> dict[str, Path]:
    """A media file with a name that is not UTF-8 beside a text file, a dot-file, a broken link and a link loop."""
    raw.mkdir()
    odd = Path(os.fsdecode(os.fsencode(str(raw)) + b"/caf\xe9.mp4"))  # Latin-1 e-acute: no valid UTF-8
    odd.write_bytes(b"not read by a dry run")
    (raw / "notes.txt").write_text("x")
    (raw / ".hidden.mp4").write_bytes(b"x")
    (raw / "gone.mp4").symlink_to(raw / "nowhere.mp4")
    (raw / "loop.mp4").symlink_to(raw / "loop.mp4")
    return {"odd": odd}


def test_curate_dry_run_prints_undecodable_names_escaped_and_every_skip_reason(tmp_path):
    raw = tmp_path / "raw"
    odd_entries(raw)
    proc = subprocess.run([sys.executable, "-m", "jobs.curate", "--input", str(raw), "--output", str(tmp_path / "o"),
                           "--dry-run"], cwd=REPO, capture_output=True, timeout=300,
                          env=dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONIOENCODING="utf-8"))
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    text = proc.stdout.decode("utf-8")  # strict: the raw 0xE9 byte of the name would fail here
    assert f"process  {raw}/caf\\xe9.mp4" in text
    assert f"ignore   {raw}/gone.mp4  (broken_symlink: -> {raw}/nowhere.mp4; skipped)" in text
    assert f"ignore   {raw}/notes.txt  (extension: .txt; extension not in [run] extensions)" in text
    assert "skipped         4: broken_symlink 1, extension 1, hidden 1, symlink_loop 1" in text


def test_curate_summary_counts_the_runs_skipped_rows_by_reason(tmp_path, capsys):
    import pyarrow.parquet as pq

    from jobs.curate import _summary
    from pipeline.run import curate
    from pipeline.settings import CurateConfig

    raw = tmp_path / "raw"
    odd_entries(raw)
    # --limit 0 leaves no input to process (the one media file is limited away), so the run needs no Ray: it lists
    # the folder, writes its tables and counts, as any run does.
    cfg = CurateConfig.load(None, {"run": {"input": str(raw), "output": str(tmp_path / "out"), "stages": [],
                                           "register_catalog": False}})
    summary = curate(cfg, limit=0)
    _summary(summary, summary.output, None, 0.0)
    printed = capsys.readouterr().out
    reasons = pq.read_table(summary.output / "skipped.parquet").column("reason").to_pylist()
    assert sorted(reasons) == ["broken_symlink", "extension", "hidden", "symlink_loop"]
    assert "skipped        4: broken_symlink 1, extension 1, hidden 1, symlink_loop 1" in printed
    assert "ignored for their extension" not in printed


def test_curate_relative_paths_refused_inside_a_ray_job(tmp_path):
    # What the Ray job supervisor sets for a submitted driver; the real head is in test_ray_job_submit.py.
    job_env = {"RAY_JOB_CONFIG_JSON_ENV_VAR": '{"metadata": {"job_submission_id": "raysubmit_test"}}'}
    line = assert_usage_error(run_job("jobs.curate", "--input", str(tmp_path), "--output", "out/x", env=job_env),
                              "--output 'out/x'", "relative", "ray job submit", "raysubmit_test")
    assert "Ray deletes" in line
    # No --output: the config's default (relative) output is named instead.
    assert_usage_error(run_job("jobs.curate", "--input", str(tmp_path), env=job_env), "[run] output", "'out/curate'")
    # Outside a Ray job the same relative path is fine (dry run: nothing written).
    assert run_job("jobs.curate", "--input", str(tmp_path), "--output", "out/x", "--dry-run").returncode == 0


# --- jobs.shards ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("toml, named", [
    ("[buckets]\nframez = [17]\n", ["[buckets]", "'framez'"]),
    ('[ray]\ntask_cpus = "x"\n', ["ray.task_cpus", "expected float"]),
    ("[shards]\nmaxcount = 0\n", ["maxcount"]),
])
def test_shards_bad_config(catalog, tmp_path, toml, named):
    assert_usage_error(run_job("jobs.shards", "--catalog", str(catalog), "--where", "true", "--output",
                               str(tmp_path / "s"), "--config", _toml(tmp_path, toml)), *named)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("args, named", [
    (["--where", "true", "--output", "OUT"], ["--catalog"]),                               # missing flag
    (["--catalog", "/nonexistent.duckdb", "--where", "true", "--output", "OUT"], ["/nonexistent.duckdb"]),
    (["--catalog", "CATALOG", "--where", "aesthetic >= 5", "--output", "OUT"], ["--where", "aesthetic >= 5"]),
    (["--catalog", "CATALOG", "--where", "true", "--output", "OUT", "--limit", "-1"], ["--limit"]),
])
def test_shards_bad_arguments(catalog, tmp_path, args, named):
    args = [str(catalog) if a == "CATALOG" else str(tmp_path / "s") if a == "OUT" else a for a in args]
    assert_usage_error(run_job("jobs.shards", *args), *named)
    assert not (tmp_path / "s").exists()


def test_shards_dry_run_and_limit(catalog, tmp_path):
    out = tmp_path / "s"
    full = run_job("jobs.shards", "--catalog", str(catalog), "--where", "true", "--output", str(out), "--dry-run")
    assert full.returncode == 0, full.stderr
    planned = [line.split()[0] for line in full.stdout.splitlines() if f"->  {out}/" in line]
    no_bucket = [line.split()[0] for line in full.stdout.splitlines() if "fits no bucket" in line]
    assert planned and no_bucket and "ray:" not in full.stdout
    assert f"output          {out} (empty or absent)" in full.stdout

    limited = run_job("jobs.shards", "--catalog", str(catalog), "--where", "true", "--output", str(out),
                      "--dry-run", "--limit", "2")
    assert limited.returncode == 0, limited.stderr
    assert "2 kept clips match" in limited.stdout and "(first 2 by clip_id)" in limited.stdout
    first_two = sorted(planned + no_bucket)[:2]
    listed = [line.split()[0] for line in limited.stdout.splitlines() if f"->  {out}/" in line or "fits no" in line]
    assert sorted(listed) == first_two
    assert not out.exists()


def test_shards_relative_output_refused_inside_a_ray_job(catalog):
    job_env = {"RAY_JOB_CONFIG_JSON_ENV_VAR": '{"metadata": {"job_submission_id": "raysubmit_test"}}'}
    assert_usage_error(run_job("jobs.shards", "--catalog", str(catalog), "--where", "true", "--output", "rel/s",
                               env=job_env), "--output 'rel/s'", "relative")


# --- jobs.train ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("toml, named", [
    ("[train]\nstepz = 3\n", ["'stepz'", "train"]),
    ('[model]\npreset = "huge"\n', ["preset", "'huge'"]),
    ('[optim]\nlr = "fast"\n', ["optim.lr", "expected float"]),
    ('[stage]\nkind = "gan"\n', ["[stage] kind", "'gan'"]),
])
def test_train_bad_config(tmp_path, toml, named):
    assert_usage_error(run_job("jobs.train", "--config", _toml(tmp_path, toml)), *named)


@pytest.mark.parametrize("args, named", [
    ([], ["--config"]),
    (["--config", "jobs/configs/vae_stage1.toml", "--workers", "two"], ["--workers", "'two'"]),
    (["--config", "/nonexistent/stage.toml"], ["/nonexistent/stage.toml"]),
])
def test_train_bad_arguments(args, named):
    assert_usage_error(run_job("jobs.train", *args), *named)


def test_train_relative_config_paths_refused_inside_a_ray_job():
    job_env = {"RAY_JOB_CONFIG_JSON_ENV_VAR": '{"metadata": {"job_submission_id": "raysubmit_test"}}'}
    # The shipped stage config reads out/shards and writes runs/: both relative.
    assert_usage_error(run_job("jobs.train", "--config", "jobs/configs/vae_stage1.toml", env=job_env),
                       "[data] root 'out/shards'", "relative")


@pytest.mark.slow  # starts an in-process Ray to learn its size
def test_curate_refuses_a_ray_layout_that_can_never_schedule(tmp_path):
    """A decode task that cannot fit beside the model actors would leave the run waiting for ever: refused."""
    cfg = _toml(tmp_path, "[ray]\ntask_cpus = 4096.0\n")
    line = assert_usage_error(run_job("jobs.curate", "--config", cfg, "--output", str(tmp_path / "o"), "--no-catalog"),
                              "[ray] layout needs", "never be scheduled", "task_cpus")
    assert "4096" in line
    assert not (tmp_path / "o" / "clips.parquet").exists()
