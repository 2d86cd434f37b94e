"""`python -m catalog` at the console: a bad argument is one line and exit 2; set-threshold says when a threshold
leaves the clips of stand-in runs alone."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/shard_fixtures.py
from shard_fixtures import make_library, write_run

REPO = Path(__file__).resolve().parents[2]


def catalog_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "catalog", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


@pytest.fixture(scope="module")
def standin_catalog(tmp_path_factory) -> Path:
    from catalog.db import register_run

    root = tmp_path_factory.mktemp("usage")
    videos, clips = make_library(root / "raw")
    register_run(root / "catalog.duckdb", write_run(root / "run", videos, clips))  # runs.standin_models = true
    return root / "catalog.duckdb"


@pytest.mark.parametrize("args, named", [
    ([], ["db", "sql"]),
    (["DB"], ["sql"]),
    (["DB", "SELECT 1", "--format", "xml"], ["--format", "'xml'"]),
    (["DB", "SELECT 1", "--max-rows", "many"], ["--max-rows", "'many'"]),
    (["set-threshold", "DB", "aesthetic_min"], ["value"]),
    (["set-threshold", "DB", "aesthetic_min", "high"], ["value", "'high'"]),
    (["set-threshold", "DB", "aesthetic_mni", "5"], ["aesthetic_mni"]),
    (["report", "DB"], ["--output"]),
    (["register"], ["db", "run_dir"]),
])
def test_bad_arguments_are_one_line_and_exit_2(standin_catalog, args, named):
    proc = catalog_cli(*[str(standin_catalog) if a == "DB" else a for a in args])
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in proc.stderr
    assert all(n in lines[0] for n in named), lines[0]


def test_set_threshold_says_when_stand_in_runs_are_exempt(standin_catalog):
    proc = catalog_cli("set-threshold", str(standin_catalog), "aesthetic_min", "9.5")
    assert proc.returncode == 0, proc.stderr
    first, note = proc.stdout.splitlines()[:2]
    # Every clip of this catalog was scored by stand-ins: the strict threshold drops none of them, and says why.
    before, after = first.split("kept_clips: ")[1].split(" -> ")
    assert before == after
    assert note.startswith("note: aesthetic_min does not apply to ") and "stand-in models" in note
    assert "runs.standin_models" in note
    # A cheap score is applied to stand-in runs like any other: no note.
    proc = catalog_cli("set-threshold", str(standin_catalog), "sharpness_min", "0.3")
    assert proc.returncode == 0 and "stand-in" not in proc.stdout, proc.stdout
