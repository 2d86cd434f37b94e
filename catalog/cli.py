"""``python -m catalog``: SQL over a catalog file, sealed to it, plus the few explicit write commands.

    python -m catalog DB "SQL" [--format table|csv|json] [--max-rows N] [--timeout S] [--memory-limit SIZE]
    python -m catalog set-threshold DB NAME VALUE        (VALUE 'off' switches the threshold off)
    python -m catalog register DB RUN_DIR
    python -m catalog report DB --output report.html

The query connection is the seal: it opens the catalog read-only (DuckDB itself refuses any statement that would
change the file) with external access off (no other file, URL, database or extension: ``read_csv('/etc/passwd')``,
``COPY ... TO``, ``ATTACH``, ``INSTALL``, https reads all fail inside DuckDB), no extension auto-install or
auto-load, a memory limit, and the configuration locked so ``SET`` cannot undo any of it. A timer interrupts the
connection at ``--timeout`` (DuckDB 1.x has no query timeout of its own). Before anything runs, each statement is
checked by the type DuckDB's parser gives it (not by its keywords): queries, plans and table-function calls run;
anything else (writes, temporary objects, ``SET``, ``ATTACH``, ...) is refused with a pointer to the write
commands. Results stream from DuckDB in Arrow batches for every format, so a 10M-row ``--format json`` holds one
batch at a time.

Exit status: 0 ok, 1 SQL error (any DuckDB error, the timeout, a query that is not valid UTF-8), 2 usage error,
refused statement or missing file. Every error is one line on stderr.
"""
from __future__ import annotations

import argparse
import base64
import csv
import datetime as dt
import decimal
import itertools
import json
import math
import re
import sys
import threading
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import duckdb
import pyarrow as pa

from catalog import db

FORMATS = ("table", "csv", "json")
SUBCOMMANDS = ("set-threshold", "register", "report")
EXIT_SQL_ERROR = 1
EXIT_USAGE = 2
DEFAULT_TIMEOUT_S = 300.0
DEFAULT_MEMORY_LIMIT = "2GB"
BATCH_ROWS = 2048
"""Rows per Arrow batch pulled from DuckDB: the most any format holds at once (the table format holds its shown rows)."""
TABLE_BLOCK_ROWS = 10_000
"""With --max-rows 0 the table format aligns and prints this many rows at a time (the header repeats per block)."""

_T = duckdb.StatementType
# What DuckDB says a statement is: a query (SELECT also covers DESCRIBE, SHOW, SUMMARIZE, UNPIVOT, PIVOT ... IN,
# table-function PRAGMAs), a plan, or a table-function call. EXPLAIN ANALYZE runs its statement; the sealed
# read-only connection is what keeps that statement from writing anything.
_READ_TYPES = {_T.SELECT, _T.EXPLAIN, _T.CALL}
# Statements the parser itself adds in front of or after one the user wrote -- a PIVOT's temporary enum types,
# the transaction around an EXPLAIN -- carry no text of their own and run as part of it.
_HELPER_TYPES = {_T.CREATE, _T.TRANSACTION}
_SIZE = re.compile(r"^\s*\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KIB|MIB|GIB|TIB)\s*$", re.IGNORECASE)


class RefusedStatement(ValueError):
    """A statement that could write was given to the read-only query command."""


class QueryError(Exception):
    """The query could not run or finish: DuckDB's error, the timeout, or text that is not UTF-8. One line."""


class UsageError(Exception):
    """Bad command-line arguments: one line on stderr, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage block), so every usage error reads the same."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see {self.prog} --help)")


def one_line(message: str) -> str:
    """A multi-line DuckDB message (``LINE 1: ...`` and its caret) as one line; non-UTF-8 text escaped."""
    lines = [ln.strip() for ln in str(message).splitlines()]
    text = " ".join(ln for ln in lines if ln and set(ln) != {"^"})
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def check_utf8(sql: str) -> None:
    """Raise QueryError naming the first byte that is not UTF-8 (argv holds it as a surrogate escape)."""
    try:
        sql.encode("utf-8")
    except UnicodeEncodeError as exc:
        ch = ord(sql[exc.start])
        what = f"byte 0x{ch - 0xDC00:02x}" if 0xDC80 <= ch <= 0xDCFF else f"code point U+{ch:04X}"
        raise QueryError(f"the query is not valid UTF-8: {what} at character {exc.start}") from None


def check_read_only(sql: str) -> list[duckdb.Statement]:
    """Parse ``sql`` and return its statements; raise RefusedStatement for any whose DuckDB type is not read-only.

    Raises duckdb.ParserException for SQL that does not parse.
    """
    statements = duckdb.extract_statements(sql)
    if not statements:
        raise RefusedStatement("no SQL statement given")
    for st in statements:
        if st.type in _READ_TYPES or (st.type in _HELPER_TYPES and not st.query.strip()):
            continue
        name = st.type.name.replace("_", " ")
        raise RefusedStatement(
            f"refused: this command is read-only and {name} statements can write "
            f"({st.query.strip()[:80]!r}); only queries (SELECT, FROM, WITH, DESCRIBE, SHOW, SUMMARIZE, PIVOT, "
            f"EXPLAIN, CALL) run here. Thresholds change with `python -m catalog set-threshold DB NAME VALUE`."
        )
    return statements


def sealed_connection(db_path: str | Path, *, memory_limit: str = DEFAULT_MEMORY_LIMIT) -> duckdb.DuckDBPyConnection:
    """The catalog, read-only, with no way out: no external files/URLs/extensions, configuration locked."""
    config = {
        "enable_external_access": False,
        "autoinstall_known_extensions": False,
        "autoload_known_extensions": False,
        "allow_community_extensions": False,
        "memory_limit": memory_limit,
        "lock_configuration": True,  # last: SET can change none of the above
    }
    return duckdb.connect(str(db_path), read_only=True, config=config)


class _Deadline:
    """Interrupts a connection after ``seconds`` (0: never); ``check`` raises once it has fired."""

    def __init__(self, con: duckdb.DuckDBPyConnection, seconds: float) -> None:
        self.seconds = seconds
        self.fired = threading.Event()
        self._con = con
        self._timer = threading.Timer(seconds, self._fire) if seconds > 0 else None
        if self._timer is not None:
            self._timer.daemon = True
            self._timer.start()

    def _fire(self) -> None:
        self.fired.set()
        self._con.interrupt()

    def check(self) -> None:
        if self.fired.is_set():
            raise QueryError(f"stopped: the query ran past --timeout {self.seconds:g} s "
                             "(raise --timeout, or 0 for none)")

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


def stream_query(db_path: str | Path, sql: str, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 memory_limit: str = DEFAULT_MEMORY_LIMIT, batch_rows: int = BATCH_ROWS,
                 ) -> Iterator[Iterator[pa.RecordBatch]]:
    """Run read-only ``sql`` on the sealed catalog connection; yields one stream of Arrow batches per statement
    that returns rows, each to be read before the next. Raises RefusedStatement before anything runs, QueryError
    for DuckDB's errors and the timeout."""
    check_utf8(sql)
    try:
        statements = check_read_only(sql)
        con = sealed_connection(db_path, memory_limit=memory_limit)
    except duckdb.Error as exc:
        raise QueryError(one_line(str(exc))) from None
    deadline = _Deadline(con, timeout_s)
    try:
        for st in statements:
            deadline.check()
            try:
                con.execute(st)
            except duckdb.Error as exc:
                deadline.check()
                raise QueryError(one_line(str(exc))) from None
            if st.type not in _READ_TYPES or con.description is None:
                continue
            yield _batches(con.to_arrow_reader(batch_rows), deadline)
        deadline.check()
    finally:
        deadline.cancel()
        con.close()


def _batches(reader: pa.RecordBatchReader, deadline: _Deadline) -> Iterator[pa.RecordBatch]:
    """The reader's batches; an interrupt or DuckDB error part-way is a QueryError. The first batch is always
    yielded (empty when the result is), so a writer learns the schema."""
    schema, sent = reader.schema, False
    while True:
        deadline.check()
        try:
            batch = reader.read_next_batch()
        except StopIteration:
            break
        # pyarrow surfaces DuckDB's errors (the interrupt included) from inside the stream as OSError/ArrowException.
        except (duckdb.Error, OSError, pa.ArrowException) as exc:
            deadline.check()
            raise QueryError(one_line(str(exc))) from None
        sent = True
        yield batch
    if not sent:
        yield pa.RecordBatch.from_pylist([], schema=schema)


def query(db_path: str | Path, sql: str, **limits: Any) -> list[pa.Table]:
    """Run read-only ``sql`` on the catalog; one Arrow table per statement that returns rows (held in memory:
    for small results; the command line streams)."""
    return [pa.Table.from_batches(list(batches)) for batches in stream_query(db_path, sql, **limits)]


# ---------------------------------------------------------------------------------------------------------
# Output formats: each reads a stream of record batches and holds one at a time (table: its shown rows).


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


Batches = pa.Table | pa.RecordBatchReader | Iterable[pa.RecordBatch]


def _as_batches(result: Batches) -> Iterator[pa.RecordBatch]:
    """Record batches of a table or a stream; the first is always there (maybe empty), for the schema."""
    if isinstance(result, pa.Table):
        batches = result.to_batches() or [pa.RecordBatch.from_pylist([], schema=result.schema)]
        return iter(batches)
    return iter(result)


def _table_block(rows: pa.Table, out: IO[str]) -> None:
    """Align and print ``rows`` under the header and its rule."""
    types = [f.type for f in rows.schema]
    columns = [col.to_pylist() for col in rows.columns]
    # cells[c][r] is the list of text lines of column c, row r (EXPLAIN plans and captions hold newlines).
    cells = [[_cell_text(v, typ).split("\n") for v in col] for col, typ in zip(columns, types, strict=True)]
    headers = rows.column_names
    widths = [max([len(h), *(len(line) for cell in col for line in cell)]) for h, col in zip(headers, cells, strict=True)]
    right = [_is_numeric(t) for t in types]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, right, strict=True)]
        return " | ".join(parts).rstrip()

    out.write(line(headers) + "\n")
    out.write("-+-".join("-" * w for w in widths) + "\n")
    for i in range(rows.num_rows):
        height = max(len(col[i]) for col in cells) if cells else 1
        for k in range(height):
            out.write(line([col[i][k] if k < len(col[i]) else "" for col in cells]) + "\n")


def write_table(result: Batches, out: IO[str], *, max_rows: int | None = 100) -> None:
    """Aligned text table: numbers right-aligned, NULL spelled out, multi-line cells kept aligned, long results
    cut at ``max_rows`` (the rest is counted, not held). ``max_rows=None`` prints every row, aligned
    TABLE_BLOCK_ROWS at a time."""
    batches = _as_batches(result)
    first = next(batches)
    schema = first.schema
    block = TABLE_BLOCK_ROWS if max_rows is None else max_rows
    held: list[pa.RecordBatch] = []
    n_held = total = 0
    printed = False
    for batch in itertools.chain([first], batches):
        total += batch.num_rows
        while batch.num_rows and n_held < block:
            take = batch.slice(0, block - n_held)
            held.append(take)
            n_held += take.num_rows
            batch = batch.slice(take.num_rows)
            if max_rows is None and n_held == block:
                _table_block(pa.Table.from_batches(held, schema=schema), out)
                held, n_held, printed = [], 0, True
    if held or not printed:
        _table_block(pa.Table.from_batches(held, schema=schema), out)
    shown = total if max_rows is None else min(total, max_rows)
    if shown < total:
        out.write(f"({shown} of {total} rows shown; --max-rows 0 shows all, --format csv|json prints all)\n")
    else:
        out.write(f"({total} row{'' if total == 1 else 's'})\n")


def write_csv(result: Batches, out: IO[str]) -> None:
    """CSV with a header row; NULL is an empty field; lists and maps are JSON text."""
    writer = csv.writer(out, lineterminator="\n")
    header = False
    for batch in _as_batches(result):
        if not header:
            writer.writerow(batch.schema.names)
            header = True
        types = [f.type for f in batch.schema]
        columns = [col.to_pylist() for col in batch.columns]
        for i in range(batch.num_rows):
            writer.writerow(["" if col[i] is None else _cell_text(col[i], typ)
                             for col, typ in zip(columns, types, strict=True)])


def write_json(result: Batches, out: IO[str]) -> None:
    """A JSON array of row objects, written row by row."""
    out.write("[")
    sep = ""
    for batch in _as_batches(result):
        types = {f.name: f.type for f in batch.schema}
        for row in batch.to_pylist():
            out.write(sep)
            out.write(json.dumps({k: _jsonable(v, types[k]) for k, v in row.items()}, ensure_ascii=False,
                                 allow_nan=False))
            sep = ", "
    out.write("]\n")


def write_result(result: Batches, fmt: str, out: IO[str], *, max_rows: int | None = 100) -> None:
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


def _memory_limit(text: str) -> str:
    if not _SIZE.match(text):
        raise argparse.ArgumentTypeError(f"expected a size like '2GB' or '512MiB', got {text!r}")
    return text.strip()


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds (a number, 0 for none), got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected seconds >= 0 (0 for none), got {text!r}")
    return value


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
    p.add_argument("--timeout", type=_seconds, default=DEFAULT_TIMEOUT_S,
                   help=f"stop the query after this many seconds, output included; 0 for none "
                        f"(default: {DEFAULT_TIMEOUT_S:g})")
    p.add_argument("--memory-limit", type=_memory_limit, default=DEFAULT_MEMORY_LIMIT,
                   help=f"DuckDB's memory limit for the query (default: {DEFAULT_MEMORY_LIMIT})")
    return p


def run_query(argv: Sequence[str], out: IO[str], err: IO[str]) -> int:
    args = _query_parser().parse_args(argv)
    if not Path(args.db).is_file():
        err.write(f"error: catalog {one_line(args.db)} does not exist (expected a DuckDB file written by jobs.curate)\n")
        return EXIT_USAGE
    max_rows = None if args.max_rows <= 0 else args.max_rows
    try:
        for i, batches in enumerate(stream_query(args.db, args.sql, timeout_s=args.timeout,
                                                 memory_limit=args.memory_limit)):
            if i and args.format == "table":
                out.write("\n")
            write_result(batches, args.format, out, max_rows=max_rows)
    except RefusedStatement as exc:
        err.write(f"error: {one_line(str(exc))}\n")
        return EXIT_USAGE
    except QueryError as exc:
        err.write(f"error: {exc}\n")
        return EXIT_SQL_ERROR
    except duckdb.Error as exc:  # the parser's errors, raised before anything runs
        err.write(f"error: {one_line(str(exc))}\n")
        return EXIT_SQL_ERROR
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
