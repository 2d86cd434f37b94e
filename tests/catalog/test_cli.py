"""``python -m catalog``: read-only SQL, refused writes leave the file's bytes alone, clear errors, formats."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from catalog.cli import main
from catalog.db import open_catalog

REPO = Path(__file__).resolve().parents[2]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "catalog", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, check=False)


def _main(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(args), out, err)
    return code, out.getvalue(), err.getvalue()


def test_query_prints_aligned_table(registered: Path) -> None:
    proc = _cli(str(registered), "SELECT len(reject_reasons) AS n_reasons, count(*) AS clips FROM clips "
                                 "GROUP BY ALL ORDER BY ALL")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split("|") == ["n_reasons ", " clips"]
    assert set(lines[1]) <= {"-", "+"}
    assert [[f.strip() for f in line.split("|")] for line in lines[2:4]] == [["0", "4"], ["1", "1"]]
    assert lines[2].endswith("    4")  # numbers right-aligned under their header
    assert lines[-1] == "(2 rows)"
    # Every row of the table is as wide as its header: columns line up.
    assert len({len(line) for line in lines[:4]}) == 1


REFUSED = [
    "DELETE FROM clips_history",
    "CREATE TABLE x AS SELECT * FROM clips",
    "COPY (SELECT * FROM clips) TO '{tmp}/leak.csv'",
    "UPDATE thresholds SET value = 0 WHERE name = 'aesthetic_min'",
    "DROP VIEW kept_clips",
    "INSERT INTO thresholds VALUES ('x', 1, 'y')",
    "ATTACH '{tmp}/other.duckdb' AS other",
    "CREATE TEMP TABLE t AS SELECT 1",
    "EXPLAIN ANALYZE COPY (SELECT 1) TO '{tmp}/leak.csv'",
    "SELECT 1; DELETE FROM rejects",
]


@pytest.mark.parametrize("statement", REFUSED[:3])
def test_write_statements_are_refused_and_bytes_unchanged(registered: Path, tmp_path: Path, statement: str) -> None:
    before = _sha(registered)
    proc = _cli(str(registered), statement.format(tmp=tmp_path))
    assert proc.returncode == 2
    assert "refused" in proc.stderr and "read-only" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
    assert _sha(registered) == before
    assert not (tmp_path / "leak.csv").exists()


def test_every_kind_of_write_is_refused_in_process(registered: Path, tmp_path: Path) -> None:
    before = _sha(registered)
    for statement in REFUSED:
        code, out, err = _main(str(registered), statement.format(tmp=tmp_path))
        assert (code, out) == (2, ""), statement
        assert "refused" in err, (statement, err)
    assert _sha(registered) == before
    assert not (tmp_path / "leak.csv").exists() and not (tmp_path / "other.duckdb").exists()


def test_sql_error_prints_duckdb_message_without_traceback(registered: Path) -> None:
    before = _sha(registered)
    proc = _cli(str(registered), "SELECT no_such_column FROM clips")
    assert proc.returncode == 1
    assert "Binder Error" in proc.stderr and "no_such_column" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = _cli(str(registered), "SELEC 1")
    assert proc.returncode == 1 and "Parser Error" in proc.stderr and "Traceback" not in proc.stderr
    assert _sha(registered) == before


def test_missing_catalog_is_a_clear_error(tmp_path: Path) -> None:
    proc = _cli(str(tmp_path / "nope.duckdb"), "SELECT 1")
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "nope.duckdb").exists()


def test_csv_format(registered: Path, two_runs: dict) -> None:
    code, out, err = _main(str(registered), "--format", "csv",
                           "SELECT clip_id, aesthetic_mean, reject_reasons FROM clips ORDER BY clip_id")
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert len(rows) == 5
    by_id = {r["clip_id"]: r for r in rows}
    c = by_id[f"{two_runs['ids']['c']}:0-30"]
    assert c["aesthetic_mean"] == ""  # NULL
    assert json.loads(c["reject_reasons"]) == ["too_static"]
    assert float(by_id[f"{two_runs['ids']['b']}:0-150"]["aesthetic_mean"]) == pytest.approx(6.1)


def test_json_format(registered: Path) -> None:
    code, out, err = _main(str(registered), "--format", "json",
                           "SELECT run_id, started_at, models, reject_reasons, aesthetic_mean FROM clips "
                           "JOIN (SELECT run_id, min(started_at) AS started_at FROM runs GROUP BY 1) USING (run_id) "
                           "ORDER BY clip_id LIMIT 2")
    assert code == 0, err
    rows = json.loads(out)
    assert len(rows) == 2
    assert rows[0]["models"] == {"aesthetic": "standin:laion-aesthetic"}
    assert rows[0]["started_at"].startswith("2026-11-0")
    assert isinstance(rows[0]["reject_reasons"], list)


def test_multiple_statements_and_describe(registered: Path) -> None:
    code, out, err = _main(str(registered), "DESCRIBE kept_clips; SELECT count(*) AS n FROM kept_clips")
    assert code == 0, err
    assert "aesthetic_mean" in out and "FLOAT" in out
    assert out.rstrip().endswith("(1 row)")


def test_multi_line_cells_stay_aligned(registered: Path) -> None:
    code, out, _ = _main(str(registered), "SELECT 'a' || chr(10) || 'bb' AS two_lines, 7 AS n")
    assert code == 0
    assert out.splitlines()[2:4] == ["a         | 7", "bb        |"]


def test_max_rows_cuts_the_table(registered: Path) -> None:
    code, out, _ = _main(str(registered), "--max-rows", "2", "SELECT clip_id FROM clips_history")
    assert code == 0
    assert "(2 of 7 rows shown" in out


def test_set_threshold_command_changes_kept_clips(registered: Path) -> None:
    code, out, err = _main("set-threshold", str(registered), "aesthetic_min", "6")
    assert code == 0, err
    assert "kept_clips: 3 -> 1" in out
    code, out, err = _main("set-threshold", str(registered), "aesthetic_min", "off")
    assert code == 0 and "aesthetic_min = off" in out
    con = open_catalog(registered, read_only=True)
    assert con.execute("SELECT value FROM thresholds WHERE name = 'aesthetic_min'").fetchone() == (None,)
    con.close()
    code, _, err = _main("set-threshold", str(registered), "aesthetics", "6")
    assert code == 2 and "unknown threshold 'aesthetics'" in err


def test_register_command(tmp_path: Path, two_runs: dict) -> None:
    db = tmp_path / "c.duckdb"
    code, out, err = _main("register", str(db), str(two_runs["folders"][0]))
    assert code == 0 and "registered runA" in out, err
    code, out, _ = _main("register", str(db), str(two_runs["folders"][0]))
    assert code == 0 and out.startswith("unchanged")
