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
    "SELECT 1; DELETE FROM rejects",
    "INSTALL httpfs",
    "LOAD fts",
    "SET enable_external_access = true; SELECT * FROM read_csv('/etc/passwd')",
    "RESET lock_configuration",
    "DETACH catalog",
    "EXPORT DATABASE '{tmp}/export'",
    "PRAGMA enable_profiling",
    "VACUUM",
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
    assert not (tmp_path / "export").exists()


# Queries DuckDB's parser calls read-only that reach outside the catalog: the sealed connection stops each inside
# DuckDB (external access off), so they end as a one-line SQL error, print nothing and leave every file alone.
ESCAPES = [
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM read_text('/etc/hostname')",
    "SELECT * FROM read_blob('{tmp}/secret.csv')",
    "SELECT * FROM glob('/etc/*')",
    "SELECT * FROM '{tmp}/secret.csv'",
    "SELECT * FROM read_csv_auto('{tmp}/secret.csv')",
    "SELECT * FROM sniff_csv('{tmp}/secret.csv')",
    "SELECT * FROM read_parquet('https://example.com/data.parquet')",
    "SELECT * FROM read_json('http://127.0.0.1:9/x.json')",
    "SELECT * FROM '{tmp}/other.duckdb'",
    "EXPLAIN ANALYZE COPY (SELECT 1) TO '{tmp}/leak.csv'",
    "EXPLAIN ANALYZE SELECT * FROM read_csv('{tmp}/secret.csv')",
    "SELECT * FROM (SELECT 1) JOIN read_csv('{tmp}/secret.csv') ON true",
]


def test_file_url_and_extension_access_is_sealed_off(registered: Path, tmp_path: Path) -> None:
    (tmp_path / "secret.csv").write_text("secret_column\nsecret-value-42\n")
    other = open_catalog(tmp_path / "other.duckdb")
    other.close()
    files = {p: _sha(p) for p in (registered, tmp_path / "secret.csv", tmp_path / "other.duckdb")}
    for statement in ESCAPES:
        code, out, err = _main(str(registered), statement.format(tmp=tmp_path))
        assert (code, out) == (1, ""), (statement, out, err)
        assert len(err.strip().splitlines()) == 1 and "Permission Error" in err, (statement, err)
        assert "secret-value" not in err, statement
    assert {p: _sha(p) for p in files} == files
    assert not (tmp_path / "leak.csv").exists()
    # The seal is DuckDB's own setting, and locked.
    code, out, err = _main(str(registered), "--format", "json", "--memory-limit", "1GB",
                           "SELECT current_setting('enable_external_access') AS external, "
                           "current_setting('lock_configuration') AS locked, "
                           "current_setting('autoinstall_known_extensions') AS autoinstall, "
                           "current_setting('autoload_known_extensions') AS autoload, "
                           "current_setting('memory_limit') AS memory")
    assert code == 0, err
    [row] = json.loads(out)
    assert (row["external"], row["locked"], row["autoinstall"], row["autoload"]) == (False, True, False, False)
    assert row["memory"] == "953.6 MiB"  # 1 GB as DuckDB prints it


def test_read_only_statements_of_every_kind_run(registered: Path) -> None:
    """What DuckDB's parser reports as reading runs, whatever its first keyword."""
    before = _sha(registered)
    for statement, expect in [
        ("EXPLAIN SELECT count(*) FROM clips", "physical_plan"),
        ("EXPLAIN (FORMAT json) SELECT count(*) FROM clips", '"name"'),
        ("EXPLAIN ANALYZE SELECT count(*) FROM clips", "analyzed_plan"),
        ("PIVOT (SELECT len(reject_reasons) AS n FROM clips) ON n USING count(*)", "| 1"),
        ("SELECT * FROM (PIVOT (SELECT is_image FROM clips) ON is_image USING count(*))", "false"),
        ("EXPLAIN PIVOT (SELECT is_image FROM clips) ON is_image USING count(*)", "physical_plan"),
        ("UNPIVOT (SELECT 1 AS a, 2 AS b) ON a, b INTO NAME col VALUE v", "col"),
        ("SUMMARIZE SELECT aesthetic_mean FROM clips", "approx_unique"),
        ("SHOW TABLES", "kept_clips"),
        ("CALL pragma_version()", "library_version"),
        ("FROM thresholds LIMIT 1", "(1 row)"),
    ]:
        code, out, err = _main(str(registered), statement)
        assert code == 0, (statement, err)
        assert expect in out, (statement, out)
    assert _sha(registered) == before


def test_runaway_query_stops_at_the_timeout(registered: Path) -> None:
    code, out, err = _main(str(registered), "--timeout", "1",
                           "SELECT count(*) FROM range(1000000) a CROSS JOIN range(1000000) b")
    assert (code, out) == (1, "")
    assert len(err.strip().splitlines()) == 1 and "--timeout 1 s" in err, err


class _Discard(io.TextIOBase):
    def write(self, text: str) -> int:
        return len(text)


def test_timeout_also_stops_a_result_that_streams_for_ever(registered: Path) -> None:
    err = io.StringIO()
    code = main([str(registered), "--timeout", "1", "--format", "csv", "SELECT range AS i FROM range(10000000000000)"],
                _Discard(), err)
    assert code == 1 and "--timeout 1 s" in err.getvalue(), err.getvalue()


def test_bad_timeout_and_memory_limit_are_usage_errors(registered: Path) -> None:
    for args, named in ((["--timeout", "-1"], "--timeout"), (["--timeout", "soon"], "--timeout"),
                        (["--memory-limit", "lots"], "--memory-limit")):
        code, out, err = _main(str(registered), "SELECT 1", *args)
        assert code == 2 and named in err and len(err.strip().splitlines()) == 1, err


def test_invalid_utf8_query_is_one_line_exit_1(registered: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "catalog", str(registered), b"SELECT '\xff\xfe' AS x"], cwd=REPO,
                          capture_output=True, timeout=120, check=False)
    err = proc.stderr.decode()
    assert proc.returncode == 1 and proc.stdout == b"", err
    assert len(err.strip().splitlines()) == 1 and "not valid UTF-8" in err and "0xff" in err, err
    assert "Traceback" not in err


def test_duckdb_errors_are_one_line(registered: Path) -> None:
    for statement in ("SELECT no_such_column FROM clips", "SELECT 1 +", "SELECT 'a'::INTEGER",
                      "SELECT * FROM range(3) WHERE error('boom ' || range) IS NULL"):
        code, out, err = _main(str(registered), statement)
        assert code == 1 and out == "", statement
        assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), (statement, err)


N_STREAM = 25_000  # more than a dozen batches of BATCH_ROWS


def test_every_format_streams_long_results_whole(registered: Path) -> None:
    sql = f"SELECT range AS i, 'row ' || range AS s FROM range({N_STREAM})"
    code, out, err = _main(str(registered), "--format", "json", sql)
    assert code == 0, err
    rows = json.loads(out)
    assert len(rows) == N_STREAM and rows[-1] == {"i": N_STREAM - 1, "s": f"row {N_STREAM - 1}"}
    code, out, err = _main(str(registered), "--format", "csv", sql)
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == N_STREAM + 1 and lines[0] == "i,s" and lines[-1] == f"{N_STREAM - 1},row {N_STREAM - 1}"
    code, out, err = _main(str(registered), "--max-rows", "3", sql)
    assert code == 0, err
    assert out.splitlines()[-1].startswith(f"(3 of {N_STREAM} rows shown")
    assert len(out.splitlines()) == 2 + 3 + 1


def test_table_of_all_rows_prints_in_aligned_blocks(registered: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import catalog.cli as cli

    monkeypatch.setattr(cli, "TABLE_BLOCK_ROWS", 1000)
    code, out, err = _main(str(registered), "--max-rows", "0", "SELECT range AS i FROM range(2500)")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[-1] == "(2500 rows)"
    assert sum(1 for ln in lines if ln.strip() == "i") == 3  # a header per block of 1000
    assert [int(ln) for ln in lines if ln.strip().isdigit()] == list(range(2500))


def test_empty_result_keeps_its_header_in_every_format(registered: Path) -> None:
    sql = "SELECT clip_id, frames FROM clips WHERE false"
    assert _main(str(registered), sql)[1].splitlines()[0].split("|")[0].strip() == "clip_id"
    assert _main(str(registered), "--format", "csv", sql)[1] == "clip_id,frames\n"
    assert _main(str(registered), "--format", "json", sql)[1] == "[]\n"


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
