"""The DuckDB catalog: every curation run's Parquet tables, thresholds as data, and the views users query.

Layout of a catalog file (what a user sees with ``SHOW TABLES``; ``FROM column_docs`` explains every column):

- base tables with every registered run's rows (the schema's columns, plus ``registered_at``):
  ``videos_history``, ``clips_history``, ``rejects``, ``skipped`` (directory entries that are not media),
  ``runs`` (one row per run attempt). The two history
  tables also carry ``is_current``: true for the rows of the latest run of their video;
- ``videos`` / ``clips``: views over the current rows, exactly the schema's columns. A video curated again in a
  later run (later ``runs.started_at``) supersedes its older rows here; the history tables keep them;
- ``thresholds`` (name, value, comment) and the views that apply them to the stored scores:
  ``clip_verdicts`` (per clip: curation reasons, the thresholds it fails now, kept or not) and ``kept_clips``
  (no curation reject reason and every threshold passed). Editing a threshold row changes both at once;
- ``shards`` / ``shard_samples``: written by the shard job; created empty so joins work before any exist.

Threshold policy: a NULL value (or a missing row) switches a threshold off. A NULL score fails a threshold that is
on (clips prefiltered at curation time have no model scores), except for the OCR stage's text thresholds, which
a run without that stage passes. Motion, overlay and duration thresholds do not apply
to still images (``is_image``): an image has no motion, no content change to tell an overlay from, no length.
Aesthetic, watermark and caption-similarity thresholds do not apply to clips of runs that used tiny random stand-in
models (``runs.standin_models``): their scores are meaningless, as jobs.curate says; curation applies the same rule.

Registration is keyed by ``run_id``: registering a run folder replaces that run's rows with the folder's
current content in one transaction, and registering an unchanged folder again writes nothing at all. It is atomic
at the file level too: the new catalog is built in a copy beside the file and renamed over it once complete, so a
registration killed at any point leaves the previous catalog (or none) exactly as it was.
"""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import math
import os
import shutil
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from catalog import schema

# Parquet file (or folder of parts) per table in a curation output folder.
RUN_FILES: dict[str, str] = {
    "videos": "videos.parquet",
    "clips": "clips.parquet",
    "rejects": "rejects.parquet",
    "skipped": "skipped.parquet",
    "runs": "runs.parquet",
}
# Tables a run folder may lack (written since): registered as empty.
OPTIONAL_RUN_FILES = ("skipped",)
# Base table holding every registered run's rows of each input table.
BASE_TABLES: dict[str, str] = {
    "videos": "videos_history",
    "clips": "clips_history",
    "rejects": "rejects",
    "skipped": "skipped",
    "runs": "runs",
}
SHARD_TABLES = ("shards", "shard_samples")
# Training lineage: written by register_checkpoint (the training jobs call it).
LINEAGE_TABLES = ("checkpoints", "checkpoint_clips")
# Columns added to catalog.schema after runs had been written with it: a run folder without them still registers,
# with NULLs there (the report then shows a placeholder card instead of a preview).
ADDED_COLUMNS: dict[str, tuple[str, ...]] = {"clips": ("preview_jpeg", "text_area_max", "text_area_mean", "text_boxes",
                                                      "text_persistent_area", "text_persistent_box",
                                                      "text_mark", "text_mark_confidence", "text_mark_box",
                                                      "overlay_clip_score", "overlay_video_score", "overlay_video_box"),
                                             "videos": ("damaged_frames", "overlay_score", "overlay_box")}
DEFAULT_FILENAME = "catalog.duckdb"

REGISTERED_AT_DOC = "when this row was copied into the catalog"
IS_CURRENT_DOC = ("true for the rows of the latest run of this video (the run that started last); the videos and "
                  "clips views show exactly these rows")
STANDIN_DOC = ("runs.standin_models of the run that scored this row: its model scores (aesthetic, watermark, caption "
               "similarity) come from tiny random stand-ins, so thresholds on them are not applied to it")
# History tables where the latest run of a video supersedes its older rows.
CURRENT_TABLES = ("videos_history", "clips_history")


# ---------------------------------------------------------------------------------------------------------
# Thresholds: one rule per threshold row. kept_clips and clip_verdicts are generated from these rules, so
# the two views can never disagree.


@dataclasses.dataclass(frozen=True, slots=True)
class ThresholdRule:
    """How one ``thresholds`` row applies to a clips column."""

    name: str
    column: str
    op: str  # ">=" (value is a minimum) or "<=" (value is a maximum)
    default: float | None  # None: off until a user sets it
    doc: str
    temporal: bool = False  # meaningless for a still image: not applied to is_image clips
    model: bool = False  # a neural model's score: not applied to clips scored by stand-ins (runs.standin_models)
    # NULL passes: the score comes from an optional stage (a run without it keeps its clips; clips prefiltered before
    # it have reject_reasons anyway)
    null_passes: bool = False

    def __post_init__(self) -> None:
        assert self.op in (">=", "<="), f"op must be '>=' or '<=', got {self.op!r}"
        assert self.column in schema.CLIPS.names, f"{self.column!r} is not a clips column"


THRESHOLD_RULES: tuple[ThresholdRule, ...] = (
    ThresholdRule(
        "sharpness_min", "sharpness_low", ">=", 0.25,
        "lowest clips.sharpness_low kept (10th percentile over frames of the sharpest-tiles focus measure: ~0.35-1.1 "
        "in focus, < 0.2 blurred; 0.25 is also curation's [prefilter] cut); NULL (runs before the column) passes",
        null_passes=True,
    ),
    ThresholdRule(
        "change_min", "pixel_change", ">=", 0.002,
        "lowest clips.pixel_change kept: drops frozen footage (stills, slideshows dressed as video), never calm "
        "tripod or talking-head shots; not applied to images; NULL (runs before the column) passes",
        temporal=True, null_passes=True,
    ),
    ThresholdRule(
        "motion_min", "motion_mean", ">=", None,
        "lowest clips.motion_mean kept, px/s at 256 px; off by default (talking heads and tripod shots score "
        "0.3-1 and are wanted; frozen footage is change_min's); not applied to images",
        temporal=True,
    ),
    ThresholdRule(
        "motion_max", "motion_mean", "<=", None,
        "highest clips.motion_mean kept, px/s at 256 px (drops whip pans and shaky footage); off by default: set it "
        "from the motion_mean histogram of the report; not applied to images",
        temporal=True,
    ),
    ThresholdRule(
        "overlay_max", "overlay_score", "<=", 0.5,
        "highest clips.overlay_score kept (static logos, channel bugs, burnt-in text); not applied to images, "
        "which have no content change to tell an overlay from the scene",
        temporal=True,
    ),
    ThresholdRule(
        "text_area_max", "text_area_max", "<=", 0.02,
        "highest clips.text_area_max kept: share of a frame covered by detected text (subtitles ~0.03-0.06 per line, "
        "title cards more); the real PP-OCRv4 detector, stand-in runs included; NULL (no OCR stage) passes",
        null_passes=True,
    ),
    ThresholdRule(
        "text_persistent_max", "text_persistent_area", "<=", 0.003,
        "highest clips.text_persistent_area kept: text that stays in place across the clip (watermark, timestamp, "
        "channel name; a small corner mark covers ~0.005-0.01); NULL (no OCR stage) passes",
        null_passes=True,
    ),
    ThresholdRule(
        "text_mark_max", "text_mark_confidence", "<=", 0.5,
        "highest clips.text_mark_confidence kept: text of 2+ characters, a letter among them, read in a corner of the "
        "clip's mean frame (marks 0.6-1, also over static content; clean footage <= 0.36); NULL (no OCR stage) passes",
        null_passes=True,
    ),
    ThresholdRule(
        "watermark_max", "watermark_prob", "<=", 0.8,
        "highest clips.watermark_prob kept (LAION watermark classifier; 0.5-0.8 in use, 0.8 the common choice); "
        "not applied to runs with stand-in models",
        model=True,
    ),
    ThresholdRule(
        "aesthetic_min", "aesthetic_mean", ">=", 4.5,
        "lowest clips.aesthetic_mean kept (LAION aesthetic, ~1-10; 4.5-5.0 typical, 5.5 fair, 6.5 high); "
        "not applied to runs with stand-in models",
        model=True,
    ),
    ThresholdRule(
        "caption_similarity_min", "caption_similarity", ">=", 0.2,
        "lowest CLIP cosine similarity between caption and frames kept (catches captions about something else); "
        "not applied to runs with stand-in models",
        model=True,
    ),
    ThresholdRule(
        "duration_min", "duration", ">=", 2.0,
        "shortest clip kept, seconds; not applied to images", temporal=True,
    ),
    ThresholdRule(
        "duration_max", "duration", "<=", 10.0,
        "longest clip kept, seconds; not applied to images", temporal=True,
    ),
)
RULES_BY_NAME = {r.name: r for r in THRESHOLD_RULES}


def _sentinel(rule: ThresholdRule) -> str:
    """The value that passes every score: -inf for a minimum, +inf for a maximum."""
    return "'-inf'::DOUBLE" if rule.op == ">=" else "'inf'::DOUBLE"


def _rule_passes_sql(rule: ThresholdRule, t: str = "t", c: str = "c") -> str:
    """SQL boolean, never NULL: the clip passes ``rule``.

    ``t.<name>`` is the effective limit from :func:`_thresholds_rows_sql`: the row's value, or the sentinel when the
    threshold is off or does not apply to this kind of clip. A NULL score is compared as the sentinel too, so it
    fails every finite limit (clips prefiltered at curation time have no model scores and must not pass on them)
    and passes a threshold that is off or does not apply.
    """
    missing = ("'inf'::DOUBLE" if rule.op == ">=" else "'-inf'::DOUBLE") if rule.null_passes else _sentinel(rule)
    return f"coalesce({c}.{rule.column}::DOUBLE, {missing}) {rule.op} {t}.{rule.name}"


def _applicable(rule: ThresholdRule, *, image: bool, standin: bool) -> bool:
    return not (image and rule.temporal) and not (standin and rule.model)


def _thresholds_rows_sql() -> str:
    """Four rows keyed by (k_image, k_standin), one column per threshold, read from the thresholds table at query time.

    Each column holds the effective limit for clips of that kind: the row's value, or the rule's sentinel when the
    value is NULL (off) or the rule does not apply to that kind of clip (temporal rules and images, model-score
    rules and stand-in runs). Joining clips on the two keys turns every exemption into data, so the filter is a
    plain AND of comparisons, which DuckDB runs several times faster than one full of ORs (bench/catalog_query.py).
    """
    selects = []
    for image in (False, True):
        for standin in (False, True):
            cols = [f"{str(image).lower()} AS k_image", f"{str(standin).lower()} AS k_standin"]
            for r in THRESHOLD_RULES:
                value = (f"coalesce(max(value) FILTER (WHERE name = '{r.name}'), {_sentinel(r)})"
                         if _applicable(r, image=image, standin=standin) else _sentinel(r))
                cols.append(f"{value} AS {r.name}")
            selects.append("SELECT " + ", ".join(cols) + " FROM thresholds")
    return "(" + "\n        UNION ALL ".join(selects) + ")"


_KEYED_JOIN = ("coalesce(c.is_image, false) = t.k_image AND coalesce(c.standin_models, false) = t.k_standin")


# ---------------------------------------------------------------------------------------------------------
# DDL generated from catalog.schema


_SCALAR_TYPES: dict[pa.DataType, str] = {
    pa.string(): "VARCHAR",
    pa.large_string(): "VARCHAR",
    pa.int64(): "BIGINT",
    pa.int32(): "INTEGER",
    pa.int16(): "SMALLINT",
    pa.int8(): "TINYINT",
    pa.float32(): "FLOAT",
    pa.float64(): "DOUBLE",
    pa.bool_(): "BOOLEAN",
    pa.binary(): "BLOB",
    pa.date32(): "DATE",
}


def duckdb_type(typ: pa.DataType) -> str:
    """The DuckDB column type for an Arrow type used in catalog.schema."""
    if typ in _SCALAR_TYPES:
        return _SCALAR_TYPES[typ]
    if pa.types.is_timestamp(typ):
        return "TIMESTAMPTZ" if typ.tz is not None else "TIMESTAMP"
    if pa.types.is_map(typ):
        return f"MAP({duckdb_type(typ.key_type)}, {duckdb_type(typ.item_type)})"
    if pa.types.is_list(typ) or pa.types.is_large_list(typ):
        return f"{duckdb_type(typ.value_type)}[]"
    raise TypeError(f"no DuckDB type for Arrow type {typ}; expected one of {list(_SCALAR_TYPES)}, "
                    "timestamp, list or map")


def _q(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _field_doc(field: pa.Field) -> str:
    meta = field.metadata or {}
    return meta.get(b"doc", b"").decode()


def _extra_columns(table: str) -> list[tuple[str, str, str]]:
    """(name, DuckDB type, doc) of the catalog's own columns on a base table, after the schema's."""
    if table not in BASE_TABLES.values():
        return []
    extra = [("registered_at", "TIMESTAMPTZ", REGISTERED_AT_DOC)]
    if table in CURRENT_TABLES:
        extra.append(("is_current", "BOOLEAN", IS_CURRENT_DOC))
    if table == "clips_history":
        extra.append(("standin_models", "BOOLEAN", STANDIN_DOC))
    return extra


def _table_ddl(name: str, sch: pa.Schema) -> str:
    cols = [f"{f.name} {duckdb_type(f.type)}{'' if f.nullable else ' NOT NULL'}" for f in sch]
    cols += [f"{n} {typ}" for n, typ, _ in _extra_columns(name)]
    return f"CREATE TABLE IF NOT EXISTS {name} (\n    " + ",\n    ".join(cols) + "\n)"


TABLE_DOCS: dict[str, str] = {
    "videos_history": "every video row of every registered curation run (videos shows the latest run per video)",
    "clips_history": "every clip row of every registered curation run (clips shows the latest run per video)",
    "rejects": "inputs that could not be processed, all runs",
    "skipped": "directory entries under a run's input that are not media to curate, and why (all runs); with videos "
               "and rejects, every path under the input",
    "runs": "one row per curation run attempt (a resumed run keeps its run_id)",
    "shards": "WebDataset tars written by jobs.shards",
    "shard_samples": "which clip went into which shard, bucket and key",
    "checkpoints": "one row per registered training checkpoint: run, stage, step, config, the shard folder and SQL "
                   "selection it trained on, metrics; init_from links a stage to the one it started from",
    "checkpoint_clips": "which clip trained which checkpoint (its own stage's shard samples, by bucket)",
    "thresholds": "what counts as kept: edit a value (python -m catalog set-threshold) and kept_clips follows at once; "
                  "NULL value switches a threshold off",
    "videos": "videos, latest run per video_id",
    "clips": "clips of the latest run per video_id; every score, kept or not; reject_reasons from curation",
    "clip_verdicts": "per clip: curation reject_reasons, the thresholds it fails now, and whether it is kept",
    "kept_clips": "clips with no curation reject_reasons that pass every threshold in the thresholds table",
    "column_docs": "what every column of every table and view means: start here",
    "_registrations": "run folders registered and the fingerprint of their Parquet files "
                      "(makes re-registration a no-op)",
}


def _schema_for(table: str) -> pa.Schema:
    for key, base in BASE_TABLES.items():
        if base == table:
            return schema.TABLES[key]
    return schema.TABLES[table]


def _ensure_tables(con: duckdb.DuckDBPyConnection) -> None:
    for table in [*BASE_TABLES.values(), *SHARD_TABLES, *LINEAGE_TABLES]:
        sch = _schema_for(table)
        con.execute(_table_ddl(table, sch))
        # A catalog made by an older schema.py gains the columns added since (schema edits are additive).
        existing = {r[0] for r in con.execute(
            "SELECT column_name FROM duckdb_columns() WHERE table_name = ? AND schema_name = 'main'", [table]
        ).fetchall()}
        wanted = [(f.name, duckdb_type(f.type)) for f in sch] + [(n, t) for n, t, _ in _extra_columns(table)]
        for name, typ in wanted:
            if name not in existing:
                con.execute(f"ALTER TABLE {table} ADD COLUMN {name} {typ}")
    con.execute(
        "CREATE TABLE IF NOT EXISTS thresholds (name VARCHAR PRIMARY KEY, value DOUBLE, comment VARCHAR)"
    )
    con.executemany(
        "INSERT OR IGNORE INTO thresholds VALUES (?, ?, ?)",
        [(r.name, r.default, r.doc) for r in THRESHOLD_RULES],
    )
    con.execute(
        "CREATE TABLE IF NOT EXISTS _registrations (run_dir VARCHAR PRIMARY KEY, fingerprint VARCHAR NOT NULL, "
        "run_ids VARCHAR[] NOT NULL, registered_at TIMESTAMPTZ NOT NULL)"
    )


def _view_sql() -> dict[str, str]:
    """The user-facing views, in creation order."""
    videos_cols = ", ".join(f"v.{n}" for n in schema.VIDEOS.names)
    clips_cols = ", ".join(f"c.{n}" for n in schema.CLIPS.names)
    fail_list = ",\n                ".join(
        f"CASE WHEN NOT ({_rule_passes_sql(r)}) THEN '{r.name}' END" for r in THRESHOLD_RULES
    )
    passes_all = "\n              AND ".join(_rule_passes_sql(r) for r in THRESHOLD_RULES)
    return {
        "videos": f"""
            CREATE OR REPLACE VIEW videos AS
            SELECT {videos_cols} FROM videos_history v WHERE v.is_current""",
        "clips": f"""
            CREATE OR REPLACE VIEW clips AS
            SELECT {clips_cols} FROM clips_history c WHERE c.is_current""",
        "clip_verdicts": f"""
            CREATE OR REPLACE VIEW clip_verdicts AS
            SELECT c.clip_id, c.video_id, c.run_id, c.is_image, coalesce(c.standin_models, false) AS standin_models,
                   c.reject_reasons,
                   list_filter([
                {fail_list}
                   ], x -> x IS NOT NULL) AS failed_thresholds,
                   len(c.reject_reasons) = 0 AND len(failed_thresholds) = 0 AS kept
            FROM clips_history c JOIN {_thresholds_rows_sql()} t ON {_KEYED_JOIN}
            WHERE c.is_current""",
        "column_docs": """
            CREATE OR REPLACE VIEW column_docs AS
            SELECT table_name, column_name, data_type, comment FROM duckdb_columns()
            WHERE database_name = current_database() AND schema_name = 'main' AND NOT starts_with(table_name, '_')
            ORDER BY table_name, column_index""",
        "kept_clips": f"""
            CREATE OR REPLACE VIEW kept_clips AS
            SELECT {clips_cols} FROM clips_history c JOIN {_thresholds_rows_sql()} t ON {_KEYED_JOIN}
            WHERE c.is_current AND len(c.reject_reasons) = 0
              AND {passes_all}""",
    }


def _view_columns_docs() -> dict[str, dict[str, str]]:
    clips_docs = {f.name: _field_doc(f) for f in schema.CLIPS}
    return {
        "videos": {f.name: _field_doc(f) for f in schema.VIDEOS},
        "clips": clips_docs,
        "kept_clips": clips_docs,
        "clip_verdicts": {
            **{k: clips_docs[k] for k in ("clip_id", "video_id", "run_id", "is_image", "reject_reasons")},
            "standin_models": STANDIN_DOC,
            "failed_thresholds": "names of the thresholds rows this clip fails now (see thresholds.comment)",
            "kept": "true when the clip is in kept_clips",
        },
        "column_docs": {
            "table_name": "table or view", "column_name": "column", "data_type": "DuckDB type",
            "comment": "what the column holds",
        },
    }


def _comment_everything(con: duckdb.DuckDBPyConnection) -> None:
    for table in [*BASE_TABLES.values(), *SHARD_TABLES, *LINEAGE_TABLES]:
        sch = _schema_for(table)
        for f in sch:
            con.execute(f"COMMENT ON COLUMN {table}.{f.name} IS {_q(_field_doc(f))}")
        for name, _, doc in _extra_columns(table):
            con.execute(f"COMMENT ON COLUMN {table}.{name} IS {_q(doc)}")
    thresholds_docs = {
        "name": "threshold name; the comment says which clips column it applies to",
        "value": "the limit; NULL switches the threshold off",
        "comment": "what the threshold does and which clips column it reads",
    }
    for col, doc in thresholds_docs.items():
        con.execute(f"COMMENT ON COLUMN thresholds.{col} IS {_q(doc)}")
    for view, docs in _view_columns_docs().items():
        for col, doc in docs.items():
            con.execute(f"COMMENT ON COLUMN {view}.{col} IS {_q(doc)}")
    views = {r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}
    for name, doc in TABLE_DOCS.items():
        kind = "VIEW" if name in views else "TABLE"
        con.execute(f"COMMENT ON {kind} {name} IS {_q(doc)}")


# Bump when the generated DDL or view SQL changes shape in a way a hash of the SQL would not catch.
_LAYOUT_VERSION = "1"


def _layout_hash() -> str:
    parts = [_LAYOUT_VERSION, *(_view_sql().values())]
    for table, sch in schema.TABLES.items():
        parts.append(table + ":" + ",".join(f"{f.name}:{f.type}:{_field_doc(f)}" for f in sch))
    parts += [f"{r.name}:{r.doc}" for r in THRESHOLD_RULES]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _ensure_layout(con: duckdb.DuckDBPyConnection) -> None:
    """Create or update tables, views and comments; a catalog already up to date is not written to."""
    con.execute("CREATE TABLE IF NOT EXISTS _catalog_meta (key VARCHAR PRIMARY KEY, value VARCHAR)")
    want = _layout_hash()
    row = con.execute("SELECT value FROM _catalog_meta WHERE key = 'layout'").fetchone()
    if row is not None and row[0] == want:
        return
    con.execute("BEGIN TRANSACTION")
    try:
        _ensure_tables(con)
        for sql in _view_sql().values():
            con.execute(sql)
        _comment_everything(con)
        con.execute("INSERT OR REPLACE INTO _catalog_meta VALUES ('layout', ?)", [want])
        con.execute("COMMIT")
    except duckdb.Error:
        con.execute("ROLLBACK")
        raise


def open_catalog(path: str | Path, read_only: bool = False) -> duckdb.DuckDBPyConnection:
    """Open (and, writable, create or bring up to date) a catalog file.

    Args:
        path: the ``.duckdb`` file.
        read_only: open without any write; the file must exist.
    """
    path = Path(path)
    if read_only:
        if not path.is_file():
            raise FileNotFoundError(f"catalog {path} does not exist (expected a DuckDB file written by "
                                    "jobs.curate or `python -m catalog register`)")
        return duckdb.connect(str(path), read_only=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(str(path))
    _ensure_layout(con)
    return con


# ---------------------------------------------------------------------------------------------------------
# Registration


@dataclasses.dataclass(frozen=True, slots=True)
class RegisterResult:
    """What one ``register_run`` call did."""

    db_path: str
    run_dir: str
    run_ids: tuple[str, ...]
    changed: bool  # false: the folder was registered before with the same content; nothing was written
    rows: dict[str, int]  # input table -> rows copied (0 for all when unchanged)
    replaced: dict[str, int]  # base table -> rows of the same run_ids removed first (an earlier registration)


class RunFolderError(ValueError):
    """A curation output folder does not hold the expected Parquet tables."""


def _read_run_table(run_dir: Path, key: str) -> pa.Table:
    path = run_dir / RUN_FILES[key]
    if not path.exists() and key in OPTIONAL_RUN_FILES:
        return schema.empty(key)
    if not path.exists():
        found = sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else []
        raise RunFolderError(f"{run_dir}: expected {RUN_FILES[key]} (one of {sorted(RUN_FILES.values())}), "
                             f"found {found}")
    table = pq.read_table(path)
    want = schema.TABLES[key]
    for name in ADDED_COLUMNS.get(key, ()):
        if name not in table.column_names:
            table = table.append_column(want.field(name), pa.nulls(table.num_rows, want.field(name).type))
    missing = [n for n in want.names if n not in table.column_names]
    extra = [n for n in table.column_names if n not in want.names]
    if missing or extra:
        raise RunFolderError(f"{path}: columns differ from catalog.schema {key!r}: missing {missing}, "
                             f"unexpected {extra}")
    try:
        return table.select(want.names).cast(want)
    except (ValueError, pa.ArrowNotImplementedError) as exc:  # ArrowInvalid is a ValueError
        raise RunFolderError(f"{path}: cannot cast to catalog.schema {key!r} (nothing was registered): {exc}") from exc


def _fingerprint(run_dir: Path) -> str:
    """Hash of the bytes of every Parquet file of the run folder (files or folders of parts)."""
    h = hashlib.sha256()
    for key in sorted(RUN_FILES):
        path = run_dir / RUN_FILES[key]
        if not path.exists():  # an optional table the folder lacks
            continue
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            h.update(str(f.relative_to(run_dir)).encode() + b"\0")
            with f.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


def _replace_run_rows(con: duckdb.DuckDBPyConnection, tables: dict[str, pa.Table], run_ids: list[str],
                      now: datetime) -> dict[str, int]:
    """Inside a transaction: swap the rows of ``run_ids`` for ``tables`` and recompute which run is current.

    Only videos touched by these runs (in their old or new rows) are re-decided; a first registration of a large
    run therefore inserts its rows already marked, instead of updating them afterwards.
    """
    replaced: dict[str, int] = {}
    con.execute("CREATE OR REPLACE TEMP TABLE _affected (video_id VARCHAR)")
    for base in BASE_TABLES.values():
        if base in CURRENT_TABLES:
            con.execute(f"INSERT INTO _affected SELECT DISTINCT video_id FROM {base} WHERE list_contains(?, run_id)",
                        [run_ids])
        replaced[base] = con.execute(f"DELETE FROM {base} WHERE list_contains(?, run_id)", [run_ids]).fetchone()[0]
    for key in ("videos", "clips"):
        con.register(f"_in_{key}", tables[key])
    try:
        con.register("_in_runs", tables["runs"])
        cols = ", ".join(schema.RUNS.names)
        con.execute(f"INSERT INTO runs ({cols}, registered_at) SELECT {cols}, ? FROM _in_runs", [now])
        con.unregister("_in_runs")
        con.execute("INSERT INTO _affected SELECT DISTINCT video_id FROM _in_videos "
                    "UNION SELECT DISTINCT video_id FROM _in_clips")
        # The latest run per affected video: the run that started last (registration time, then run_id, break
        # ties). Runs of a video are read from both videos and clips rows, so neither table can disagree.
        con.execute("""
            CREATE OR REPLACE TEMP TABLE _latest AS
            WITH affected AS (SELECT DISTINCT video_id FROM _affected),
            pairs AS (
                SELECT video_id, run_id FROM videos_history SEMI JOIN affected USING (video_id)
                UNION SELECT video_id, run_id FROM clips_history SEMI JOIN affected USING (video_id)
                UNION SELECT video_id, run_id FROM _in_videos
                UNION SELECT video_id, run_id FROM _in_clips
            ),
            run_order AS (
                SELECT run_id, min(started_at) AS began, min(registered_at) AS reg FROM runs GROUP BY run_id
            )
            SELECT p.video_id, arg_max(p.run_id, (coalesce(o.began, o.reg, 'epoch'::TIMESTAMPTZ),
                                                  coalesce(o.reg, 'epoch'::TIMESTAMPTZ), p.run_id)) AS run_id
            FROM pairs p LEFT JOIN run_order o USING (run_id)
            GROUP BY p.video_id""")
        for key in ("videos", "clips"):
            base = BASE_TABLES[key]
            cols = ", ".join(f"i.{n}" for n in schema.TABLES[key].names)
            names = ", ".join(schema.TABLES[key].names)
            extra_names, extra_sql, join = "", "", ""
            if key == "clips":
                extra_names, extra_sql = ", standin_models", ", coalesce(s.standin, false)"
                join = ("LEFT JOIN (SELECT run_id, bool_or(standin_models) AS standin FROM runs GROUP BY run_id) s "
                        "ON s.run_id = i.run_id")
            con.execute(f"""
                INSERT INTO {base} ({names}, registered_at, is_current{extra_names})
                SELECT {cols}, ?, coalesce(i.run_id = l.run_id, false){extra_sql}
                FROM _in_{key} i LEFT JOIN _latest l USING (video_id) {join}""", [now])
            # Older rows of the same videos: only those whose verdict flips are written.
            con.execute(f"""
                UPDATE {base} h SET is_current = (h.run_id = l.run_id)
                FROM _latest l
                WHERE h.video_id = l.video_id AND NOT list_contains(?, h.run_id)
                  AND h.is_current IS DISTINCT FROM (h.run_id = l.run_id)""", [run_ids])
    finally:
        for key in ("videos", "clips"):
            con.unregister(f"_in_{key}")
    for key in ("rejects", "skipped"):
        con.register(f"_in_{key}", tables[key])
        try:
            cols = ", ".join(schema.TABLES[key].names)
            con.execute(f"INSERT INTO {BASE_TABLES[key]} ({cols}, registered_at) SELECT {cols}, ? FROM _in_{key}",
                        [now])
        finally:
            con.unregister(f"_in_{key}")
    con.execute("DROP TABLE _affected")
    con.execute("DROP TABLE _latest")
    return replaced


def register_run(db_path: str | Path, run_dir: str | Path) -> RegisterResult:
    """Copy one curation output folder's tables into the catalog at ``db_path`` (created if absent).

    The folder must hold videos/clips/rejects/runs Parquet with catalog.schema's columns. Rows are keyed by
    run_id: the run ids found in the folder have their earlier rows replaced, in one transaction, so a resumed
    run registered again ends with its final rows and no duplicates. An unchanged folder is not written at all.
    """
    run_dir = Path(run_dir).resolve()
    if not run_dir.is_dir():
        raise RunFolderError(f"run folder {run_dir} does not exist (expected a jobs.curate output folder)")
    tables = {key: _read_run_table(run_dir, key) for key in RUN_FILES}
    run_ids = sorted(set().union(*(set(pc.unique(t.column("run_id")).to_pylist()) for t in tables.values())))
    if not run_ids:
        raise RunFolderError(f"{run_dir}: no rows with a run_id in {sorted(RUN_FILES.values())}")
    fingerprint = _fingerprint(run_dir)
    db_path = Path(db_path)
    if _registered_fingerprint(db_path, run_dir) == fingerprint:
        return RegisterResult(str(db_path), str(run_dir), tuple(run_ids), False,
                              {k: 0 for k in RUN_FILES}, {b: 0 for b in BASE_TABLES.values()})

    # Built in a copy, renamed over the catalog when complete: a kill at any point leaves the old file untouched.
    db_path.parent.mkdir(parents=True, exist_ok=True)
    work = db_path.with_name(f".{db_path.name}.registering")
    # One registration at a time per catalog (two copies renamed in turn would lose the first one's rows).
    lock = open(db_path.with_name(f".{db_path.name}.lock"), "a")  # noqa: SIM115 - held until the rename
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _register_copy(db_path, work, run_dir, tables, run_ids, fingerprint)
    finally:
        lock.close()


def _register_copy(db_path: Path, work: Path, run_dir: Path, tables: dict[str, pa.Table], run_ids: list[str],
                   fingerprint: str) -> RegisterResult:
    _remove_db(work)  # what a killed registration left
    try:
        if db_path.exists():
            _checkpoint(db_path)  # fold any write-ahead log into the file, so the copy alone is the whole catalog
            shutil.copyfile(db_path, work)
        con = open_catalog(work)
        try:
            now = datetime.now(UTC)
            con.execute("BEGIN TRANSACTION")
            try:
                replaced = _replace_run_rows(con, tables, run_ids, now)
                con.execute("INSERT OR REPLACE INTO _registrations VALUES (?, ?, ?, ?)",
                            [str(run_dir), fingerprint, run_ids, now])
                con.execute("COMMIT")
            except duckdb.Error as exc:
                con.execute("ROLLBACK")
                if isinstance(exc, duckdb.ConstraintException):
                    raise RunFolderError(f"{run_dir}: rows break the catalog's constraints (nothing was "
                                         f"registered): {exc}") from exc
                raise
            con.execute("CHECKPOINT")
        finally:
            con.close()
        os.replace(work, db_path)
    finally:
        _remove_db(work)
    return RegisterResult(str(db_path), str(run_dir), tuple(run_ids), True,
                          {k: t.num_rows for k, t in tables.items()}, replaced)


def _remove_db(path: Path) -> None:
    for p in (path, path.with_name(path.name + ".wal")):
        p.unlink(missing_ok=True)


def _checkpoint(db_path: Path) -> None:
    if db_path.with_name(db_path.name + ".wal").exists():
        con = duckdb.connect(str(db_path))
        try:
            con.execute("CHECKPOINT")
        finally:
            con.close()


def _registered_fingerprint(db_path: Path, run_dir: Path) -> str | None:
    """The fingerprint ``run_dir`` was last registered with in the catalog at ``db_path``, if any (read only)."""
    if not db_path.is_file():
        return None
    try:
        con = duckdb.connect(str(db_path), read_only=True)
    except duckdb.Error:
        return None  # not readable as it is (a write-ahead log to replay, another writer): register afresh
    try:
        row = con.execute("SELECT fingerprint FROM _registrations WHERE run_dir = ?", [str(run_dir)]).fetchone()
    except duckdb.CatalogException:  # a catalog from before registrations were recorded
        return None
    finally:
        con.close()
    return None if row is None else row[0]


# ---------------------------------------------------------------------------------------------------------
# Thresholds and other writes


def set_threshold(con: duckdb.DuckDBPyConnection, name: str, value: float | None) -> None:
    """Set one threshold; ``None`` switches it off. kept_clips reflects it on the next query."""
    if name not in RULES_BY_NAME:
        raise KeyError(f"unknown threshold {name!r}; expected one of {sorted(RULES_BY_NAME)}")
    if value is not None:
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"threshold {name}: expected a finite number or None, got {value!r}")
    rule = RULES_BY_NAME[name]
    con.execute("INSERT OR REPLACE INTO thresholds VALUES (?, ?, ?)", [name, value, rule.doc])


def thresholds(con: duckdb.DuckDBPyConnection) -> dict[str, float | None]:
    """Current threshold values by name."""
    return dict(con.execute("SELECT name, value FROM thresholds ORDER BY name").fetchall())


def append_rows(con: duckdb.DuckDBPyConnection, table: str, rows: pa.Table | Iterable[dict]) -> int:
    """Append rows to ``shards`` or ``shard_samples`` (columns exactly catalog.schema's); returns the count."""
    if table not in SHARD_TABLES:
        raise ValueError(f"append_rows writes {SHARD_TABLES}, got {table!r}; runs are added by register_run")
    arrow = rows if isinstance(rows, pa.Table) else schema.to_table(table, list(rows))
    want = schema.TABLES[table]
    if sorted(arrow.column_names) != sorted(want.names):
        raise ValueError(f"{table}: expected columns {want.names}, got {arrow.column_names}")
    arrow = arrow.select(want.names).cast(want)
    cols = ", ".join(want.names)
    con.register("_incoming", arrow)
    try:
        con.execute(f"INSERT INTO {table} ({cols}) SELECT {cols} FROM _incoming")
    finally:
        con.unregister("_incoming")
    return arrow.num_rows


# ---------------------------------------------------------------------------------------------------------
# Training lineage


def clip_ids_sha256(clip_ids: Iterable[str]) -> str:
    """The hash a selection is recorded by: sha256 of the distinct clip ids, sorted, newline-joined."""
    return hashlib.sha256("\n".join(sorted(set(clip_ids))).encode()).hexdigest()


@dataclasses.dataclass(frozen=True, slots=True)
class CheckpointRecord:
    """What ``register_checkpoint`` wrote."""

    checkpoint: str
    clips: int  # checkpoint_clips rows (one per clip and bucket)
    distinct_clips: int


def register_checkpoint(db_path: str | Path, *, checkpoint: str | Path, run: str, stage: str, kind: str, step: int,
                        config: dict, shards_output: str | Path, buckets: Iterable[str],
                        init_from: str | Path | None = None, selection: str | None = None,
                        selection_rows: int | None = None, selection_sha256: str | None = None,
                        metrics: dict | None = None) -> CheckpointRecord:
    """Record a training checkpoint and the clips that trained it; registering the same checkpoint again
    replaces its rows.

    ``shards_output`` is the shard folder the stage read (pixels or precomputed: both carry each sample's clip
    id); its ``shards`` / ``shard_samples`` rows are recorded first when the catalog lacks them, and the
    checkpoint's clips are that folder's samples in ``buckets``. ``selection`` defaults to the WHERE its
    manifest names.
    """
    import json

    from catalog.shard_index import register_output
    from catalog.shards import MANIFEST, read_manifest

    out = Path(shards_output).resolve()
    manifest = read_manifest(out)
    if manifest is None:
        raise FileNotFoundError(f"shards_output {out}: expected a shard folder with {MANIFEST}")
    buckets = sorted(set(buckets))
    unknown = [b for b in buckets if b not in manifest["buckets"]]
    if unknown:
        raise ValueError(f"buckets {unknown}: not in {out / MANIFEST}, which lists {sorted(manifest['buckets'])}")
    register_output(db_path, out)  # idempotent: writes nothing when the catalog already has these rows
    row = {
        "checkpoint": str(Path(checkpoint).resolve()), "run": run, "stage": stage, "kind": kind, "step": int(step),
        "config": json.dumps(config, sort_keys=True, default=str),
        "init_from": str(Path(init_from).resolve()) if init_from else None,
        "shards_output": str(out), "shard_manifest_sha256": hashlib.sha256((out / MANIFEST).read_bytes()).hexdigest(),
        "buckets": buckets, "selection": selection if selection is not None else manifest.get("where"),
        "selection_rows": selection_rows, "selection_sha256": selection_sha256,
        "metrics": json.dumps(metrics or {}, sort_keys=True, default=str), "registered_at": datetime.now(UTC),
    }
    table = schema.to_table("checkpoints", [row])
    con = open_catalog(db_path)
    try:
        con.execute("BEGIN TRANSACTION")
        try:
            con.execute("DELETE FROM checkpoints WHERE checkpoint = ?", [row["checkpoint"]])
            con.execute("DELETE FROM checkpoint_clips WHERE checkpoint = ?", [row["checkpoint"]])
            con.register("_incoming", table)
            con.execute(f"INSERT INTO checkpoints ({', '.join(schema.CHECKPOINTS.names)}) "
                        f"SELECT {', '.join(schema.CHECKPOINTS.names)} FROM _incoming")
            con.unregister("_incoming")
            con.execute(
                "INSERT INTO checkpoint_clips (checkpoint, clip_id, video_id, bucket, shard, output) "
                "SELECT DISTINCT ?, clip_id, video_id, bucket, shard, output FROM shard_samples "
                "WHERE output = ? AND list_contains(?::VARCHAR[], bucket)",
                [row["checkpoint"], str(out), buckets],
            )
            n, distinct = con.execute("SELECT count(*), count(DISTINCT clip_id) FROM checkpoint_clips "
                                      "WHERE checkpoint = ?", [row["checkpoint"]]).fetchone()
            con.execute("COMMIT")
        except duckdb.Error:
            con.execute("ROLLBACK")
            raise
    finally:
        con.close()
    return CheckpointRecord(row["checkpoint"], int(n), int(distinct))
