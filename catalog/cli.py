"""``python -m catalog``: SQL over a catalog file, read-only, plus the few explicit write commands.

    python -m catalog DB "SQL" [--format table|csv|json] [--max-rows N]
    python -m catalog set-threshold DB NAME VALUE        (VALUE 'off' switches the threshold off)
    python -m catalog register DB RUN_DIR
    python -m catalog report DB --output report.html

Queries run on a read-only connection, and statements other than queries are refused before anything runs,
because DuckDB's read-only mode still lets ``COPY ... TO``, ``ATTACH`` and temporary objects through.
Exit status: 0 ok, 1 SQL error, 2 usage error, refused statement or missing file.
"""
from __future__ import annotations

import argparse
import base64
import csv
import datetime as dt
import decimal
import json
import math
import re
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import duckdb
import pyarrow as pa

from catalog import db

FORMATS = ("table", "csv", "json")
SUBCOMMANDS = ("set-threshold", "register", "report")
EXIT_SQL_ERROR = 1
EXIT_USAGE = 2

# Statement kinds that only read. DESCRIBE, SHOW, SUMMARIZE and table-function PRAGMAs parse as SELECT.
_READ_ONLY_TYPES = {duckdb.StatementType.SELECT}
_EXPLAIN = re.compile(r"^\s*EXPLAIN\s+(?:ANALY[SZ]E\s+)?(?P<inner>.*)$", re.IGNORECASE | re.DOTALL)


class RefusedStatement(ValueError):
    """A statement that could write was given to the read-only query command."""


class UsageError(Exception):
    """Bad command-line arguments: one line on stderr, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage block), so every usage error reads the same."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see {self.prog} --help)")


def check_read_only(sql: str) -> list[duckdb.Statement]:
    """Parse ``sql`` and return its statements; raise RefusedStatement if any is not a query.

    Raises duckdb.ParserException for SQL that does not parse.
    """
    statements = duckdb.extract_statements(sql)
    if not statements:
        raise RefusedStatement("no SQL statement given")
    for st in statements:
        kind = st.type
        if kind == duckdb.StatementType.EXPLAIN:
            # EXPLAIN ANALYZE runs its statement, so the inner statement must be a query too.
            m = _EXPLAIN.match(_strip_comments(st.query))
            if m is None:
                raise RefusedStatement(f"cannot tell what this EXPLAIN runs: {st.query.strip()[:80]!r}")
            check_read_only(m.group("inner"))
            continue
        if kind not in _READ_ONLY_TYPES:
            name = kind.name.replace("_", " ")
            raise RefusedStatement(
                f"refused: this command is read-only and {name} statements can write "
                f"({st.query.strip()[:80]!r}); only queries (SELECT, FROM, WITH, DESCRIBE, SHOW, SUMMARIZE, "
                f"EXPLAIN) run here. Thresholds change with `python -m catalog set-threshold DB NAME VALUE`."
            )
    return statements


def _strip_comments(sql: str) -> str:
    return re.sub(r"(--[^\n]*\n)|(/\*.*?\*/)", " ", sql, flags=re.DOTALL)


def query(db_path: str | Path, sql: str) -> list[pa.Table]:
    """Run read-only ``sql`` on the catalog; one Arrow table per statement."""
    statements = check_read_only(sql)
    con = db.open_catalog(db_path, read_only=True)
    try:
        return [con.execute(st.query).to_arrow_table() for st in statements]
    finally:
        con.close()


# ---------------------------------------------------------------------------------------------------------
# Output formats


def _cell_text(value: Any, typ: pa.DataType) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if pa.types.is_float32(typ):
            return f"{value:.7g}"
        return repr(value)
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(_jsonable(value, typ), ensure_ascii=False)
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat(sep=" ") if isinstance(value, dt.datetime) else value.isoformat()
    if isinstance(value, bytes):  # clips.preview_jpeg: kilobytes of JPEG per row would drown `SELECT *` (json gives base64)
        return f"<{len(value):,} bytes>"
    return str(value)


def _jsonable(value: Any, typ: pa.DataType | None = None) -> Any:
    """Plain JSON values: maps become objects, NaN/inf become null, times ISO strings, bytes base64."""
    if value is None:
        return None
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        if typ is not None and pa.types.is_float32(typ):
            return float(f"{value:.7g}")
        return value
    if isinstance(value, bool | int | str):
        return value
    if isinstance(value, list) and typ is not None and pa.types.is_map(typ):
        return {str(k): _jsonable(v, typ.item_type) for k, v in value}
    if isinstance(value, list | tuple):
        inner = typ.value_type if typ is not None and (pa.types.is_list(typ) or pa.types.is_large_list(typ)) else None
        return [_jsonable(v, inner) for v in value]
    if isinstance(value, dict):
        fields = {f.name: f.type for f in typ} if typ is not None and pa.types.is_struct(typ) else {}
        return {str(k): _jsonable(v, fields.get(k)) for k, v in value.items()}
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, uuid.UUID):
        return str(value)
    return str(value)


def _is_numeric(typ: pa.DataType) -> bool:
    return pa.types.is_integer(typ) or pa.types.is_floating(typ) or pa.types.is_decimal(typ)


def write_table(result: pa.Table, out: IO[str], *, max_rows: int | None = 100) -> None:
    """Aligned text table: numbers right-aligned, NULL spelled out, multi-line cells kept aligned, long results
    cut at ``max_rows``."""
    shown = result if max_rows is None else result.slice(0, max_rows)
    types = [f.type for f in result.schema]
    columns = [col.to_pylist() for col in shown.columns]
    # cells[c][r] is the list of text lines of column c, row r (EXPLAIN plans and captions hold newlines).
    cells = [[_cell_text(v, typ).split("\n") for v in col] for col, typ in zip(columns, types, strict=True)]
    headers = result.column_names
    widths = [max([len(h), *(len(line) for cell in col for line in cell)]) for h, col in zip(headers, cells, strict=True)]
    right = [_is_numeric(t) for t in types]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, right, strict=True)]
        return " | ".join(parts).rstrip()

    out.write(line(headers) + "\n")
    out.write("-+-".join("-" * w for w in widths) + "\n")
    for i in range(shown.num_rows):
        height = max(len(col[i]) for col in cells) if cells else 1
        for k in range(height):
            out.write(line([col[i][k] if k < len(col[i]) else "" for col in cells]) + "\n")
    n = result.num_rows
    if shown.num_rows < n:
        out.write(f"({shown.num_rows} of {n} rows shown; --max-rows 0 shows all, --format csv|json prints all)\n")
    else:
        out.write(f"({n} row{'' if n == 1 else 's'})\n")


def write_csv(result: pa.Table, out: IO[str]) -> None:
    """CSV with a header row; NULL is an empty field; lists and maps are JSON text."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(result.column_names)
    types = [f.type for f in result.schema]
    columns = [col.to_pylist() for col in result.columns]
    for i in range(result.num_rows):
        row = []
        for col, typ in zip(columns, types, strict=True):
            v = col[i]
            row.append("" if v is None else _cell_text(v, typ))
        writer.writerow(row)


def write_json(result: pa.Table, out: IO[str]) -> None:
    """A JSON array of row objects."""
    types = {f.name: f.type for f in result.schema}
    rows = [{k: _jsonable(v, types[k]) for k, v in row.items()} for row in result.to_pylist()]
    json.dump(rows, out, ensure_ascii=False, allow_nan=False)
    out.write("\n")


def write_result(result: pa.Table, fmt: str, out: IO[str], *, max_rows: int | None = 100) -> None:
    if fmt == "table":
        write_table(result, out, max_rows=max_rows)
    elif fmt == "csv":
        write_csv(result, out)
    elif fmt == "json":
        write_json(result, out)
    else:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")


# ---------------------------------------------------------------------------------------------------------
# Commands


def _query_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m catalog",
        description="Run read-only SQL over a catalog. Tables: videos, clips, rejects, runs, thresholds, kept_clips, "
                    "clip_verdicts, shards, shard_samples, *_history; `FROM column_docs` explains every column. "
                    f"Other commands: {', '.join(SUBCOMMANDS)} (python -m catalog COMMAND --help).",
    )
    p.add_argument("db", help="catalog file (OUT/catalog.duckdb)")
    p.add_argument("sql", help="one or more ;-separated queries")
    p.add_argument("--format", choices=FORMATS, default="table", help="output format (default: table)")
    p.add_argument("--max-rows", type=int, default=100,
                   help="rows printed by the table format; 0 for all (default: 100)")
    return p


def run_query(argv: Sequence[str], out: IO[str], err: IO[str]) -> int:
    args = _query_parser().parse_args(argv)
    if not Path(args.db).is_file():
        err.write(f"error: catalog {args.db} does not exist (expected a DuckDB file written by jobs.curate)\n")
        return EXIT_USAGE
    try:
        results = query(args.db, args.sql)
    except RefusedStatement as exc:
        err.write(f"error: {exc}\n")
        return EXIT_USAGE
    except duckdb.Error as exc:
        err.write(f"error: {exc}\n")
        return EXIT_SQL_ERROR
    max_rows = None if args.max_rows <= 0 else args.max_rows
    for i, result in enumerate(results):
        if i and args.format == "table":
            out.write("\n")
        write_result(result, args.format, out, max_rows=max_rows)
    return 0


def _parse_threshold_value(text: str) -> float | None:
    if text.lower() in ("off", "null", "none"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'off', got {text!r}") from None


def run_set_threshold(argv: Sequence[str], out: IO[str], err: IO[str]) -> int:
    p = _Parser(prog="python -m catalog set-threshold",
                                description="Change one thresholds row; kept_clips follows at once.")
    p.add_argument("db")
    p.add_argument("name", help=f"one of: {', '.join(r.name for r in db.THRESHOLD_RULES)}")
    p.add_argument("value", type=_parse_threshold_value, help="a number, or 'off' to switch the threshold off")
    args = p.parse_args(argv)
    if not Path(args.db).is_file():
        err.write(f"error: catalog {args.db} does not exist\n")
        return EXIT_USAGE
    try:
        con = db.open_catalog(args.db)
        try:
            before = con.execute("SELECT count(*) FROM kept_clips").fetchone()[0]
            db.set_threshold(con, args.name, args.value)
            after = con.execute("SELECT count(*) FROM kept_clips").fetchone()[0]
            exempt = _exemptions(con, db.RULES_BY_NAME[args.name])
        finally:
            con.close()
    except (KeyError, ValueError) as exc:
        err.write(f"error: {exc.args[0] if isinstance(exc, KeyError) else exc}\n")
        return EXIT_USAGE
    except duckdb.Error as exc:
        err.write(f"error: {exc}\n")
        return EXIT_SQL_ERROR
    shown = "off" if args.value is None else args.value
    out.write(f"{args.name} = {shown}; kept_clips: {before} -> {after}\n")
    for line in exempt:
        out.write(f"note: {line}\n")
    return 0


def _exemptions(con: duckdb.DuckDBPyConnection, rule: db.ThresholdRule) -> list[str]:
    """Why ``rule`` leaves some clips alone: clips of stand-in runs (model scores) and still images (temporal)."""
    total, standin, images = con.execute(
        "SELECT count(*), count(*) FILTER (WHERE standin_models), count(*) FILTER (WHERE coalesce(is_image, false)) "
        "FROM clip_verdicts").fetchone()
    notes = []
    if rule.model and standin:
        runs = con.execute("SELECT count(DISTINCT run_id) FROM clip_verdicts WHERE standin_models").fetchone()[0]
        notes.append(f"{rule.name} does not apply to {standin} of {total} clips: they come from {runs} run(s) curated "
                     f"with tiny random stand-in models (runs.standin_models), whose {rule.column} is meaningless; "
                     f"curate with real models ([models] standins = false) for this threshold to select them")
    if rule.temporal and images:
        notes.append(f"{rule.name} does not apply to the {images} still image(s) (is_image): a single frame has no "
                     f"{rule.column}")
    return notes


def run_register(argv: Sequence[str], out: IO[str], err: IO[str]) -> int:
    p = _Parser(prog="python -m catalog register",
                                description="Register a curation output folder (videos/clips/rejects/runs Parquet).")
    p.add_argument("db")
    p.add_argument("run_dir")
    args = p.parse_args(argv)
    try:
        result = db.register_run(args.db, args.run_dir)
    except db.RunFolderError as exc:
        err.write(f"error: {exc}\n")
        return EXIT_USAGE
    except duckdb.Error as exc:
        err.write(f"error: {exc}\n")
        return EXIT_SQL_ERROR
    if result.changed:
        copied = ", ".join(f"{k} {v}" for k, v in result.rows.items())
        out.write(f"registered {', '.join(result.run_ids)} from {result.run_dir}: {copied}\n")
    else:
        out.write(f"unchanged: {result.run_dir} is registered with the same content\n")
    return 0


def run_report(argv: Sequence[str], out: IO[str], err: IO[str]) -> int:
    from catalog import report

    p = _Parser(prog="python -m catalog report", description="Write the static HTML report.")
    p.add_argument("db")
    p.add_argument("--output", required=True, help="HTML file to write")
    defaults = report.ReportOptions()
    p.add_argument("--clips", type=int, default=defaults.clips_per_sheet,
                   help=f"clips per contact sheet, kept and rejected (default: {defaults.clips_per_sheet})")
    args = p.parse_args(argv)
    if not Path(args.db).is_file():
        err.write(f"error: catalog {args.db} does not exist\n")
        return EXIT_USAGE
    try:
        options = report.ReportOptions(clips_per_sheet=args.clips)
        summary = report.write_report(args.db, args.output, options)
    except ValueError as exc:
        err.write(f"error: {exc}\n")
        return EXIT_USAGE
    except duckdb.Error as exc:
        err.write(f"error: {exc}\n")
        return EXIT_SQL_ERROR
    out.write(f"wrote {summary.path} ({summary.bytes:,} bytes; {summary.thumbnails} previews, "
              f"{summary.missing_previews} clips without a stored preview)\n")
    return 0


def main(argv: Sequence[str] | None = None, out: IO[str] | None = None, err: IO[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    commands = {"set-threshold": run_set_threshold, "register": run_register, "report": run_report}
    try:
        if argv and argv[0] in commands:
            return commands[argv[0]](argv[1:], out, err)
        return run_query(argv, out, err)
    except UsageError as exc:
        err.write(f"error: {exc}\n")
        return EXIT_USAGE
