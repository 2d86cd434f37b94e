"""The catalog side of the shard job: select clips by SQL, and record which clip went into which tar.

``select_clips`` reads through a read-only connection; ``read_output_index`` reads a finished shard
folder (its manifest and tars, in the ``catalog.shards`` format) into ``shards`` / ``shard_samples``
rows (catalog.schema SHARDS / SHARD_SAMPLES); ``register_output`` writes them, replacing that folder's
earlier rows in one transaction, so registering the same output twice changes nothing.
"""
from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb

from catalog import schema
from catalog.db import append_rows, open_catalog
from catalog.shards import MANIFEST, META_KEY, SampleShapeError, read_manifest


class SelectionError(ValueError):
    """The user's WHERE clause does not run against kept_clips."""


def select_clips(db_path: str | Path, where: str) -> list[dict[str, Any]]:
    """Rows of ``kept_clips`` matching ``where`` (plus ``video_uri``), ordered by clip id.

    The WHERE is parsed as one expression over kept_clips (DuckDB's relational ``filter``), so a
    stray ``)`` or ``;`` cannot widen the selection beyond kept clips; the connection is read-only.

    Raises:
        SelectionError: the WHERE is empty or DuckDB rejects it (its message is included).
    """
    if not where.strip():
        raise SelectionError("expected a WHERE condition over kept_clips (e.g. \"aesthetic_mean >= 5.0\"), got ''")
    con = open_catalog(db_path, read_only=True)
    try:
        try:
            kept = con.table("kept_clips").filter(where)
            # The report's preview strips (kilobytes a clip) are no business of the shard writer.
            kept = kept.project(", ".join(c for c in kept.columns if c != "preview_jpeg"))
            # videos may hold one row per run of a video; every one names the same file.
            uris = con.sql("SELECT video_id, any_value(uri) AS video_uri FROM videos GROUP BY video_id")
            rel = kept.join(uris, "video_id").order("clip_id")
            names, rows = rel.columns, rel.fetchall()
        except duckdb.Error as err:
            raise SelectionError(f"--where {where!r} does not run over kept_clips: {err}") from err
        return [dict(zip(names, r)) for r in rows]
    finally:
        con.close()


def read_output_index(out_dir: str | Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(shards rows, shard_samples rows) of a finished output, read from its manifest and tars."""
    out_dir = Path(out_dir).resolve()
    manifest = read_manifest(out_dir)
    if manifest is None:
        raise FileNotFoundError(f"{out_dir / MANIFEST} not found: expected a finished shard output")
    shard_rows, sample_rows = [], []
    suffix = f".{META_KEY}"
    for name, b in sorted(manifest["buckets"].items()):
        for s in b["shards"]:
            n = 0
            with tarfile.open(out_dir / s["shard"]) as tar:
                for member in tar:
                    if not member.name.endswith(suffix):
                        continue
                    meta = json.load(tar.extractfile(member))
                    sample_rows.append({
                        "key": member.name[: -len(suffix)], "clip_id": meta["clip_id"], "video_id": meta["video_id"],
                        "shard": s["shard"], "bucket": name, "output": str(out_dir),
                    })
                    n += 1
            if n != s["samples"]:
                raise SampleShapeError(f"{s['shard']}: manifest says {s['samples']} samples, the tar holds {n}")
            shard_rows.append({
                "shard": s["shard"], "bucket": name, "frames": b["frames"], "height": b["height"],
                "width": b["width"], "fps": b["fps"], "num_samples": n, "bytes": s["bytes"],
                "output": str(out_dir), "selection": manifest.get("where"),
            })
    return shard_rows, sample_rows


@dataclass(frozen=True, slots=True)
class IndexResult:
    output: str
    changed: bool  # false: the catalog already held exactly these rows
    shards: int
    samples: int


def output_rows(con: duckdb.DuckDBPyConnection, output: str) -> tuple[set[tuple], set[tuple]]:
    """The catalog's current (shards, shard_samples) rows of one output folder, as comparable sets."""
    shards = set(con.execute(
        f"SELECT {', '.join(schema.SHARDS.names)} FROM shards WHERE output = ?", [output]
    ).fetchall())
    samples = set(con.execute(
        f"SELECT {', '.join(schema.SHARD_SAMPLES.names)} FROM shard_samples WHERE output = ?", [output]
    ).fetchall())
    return shards, samples


def register_output(db_path: str | Path, out_dir: str | Path) -> IndexResult:
    """Record a finished shard output (its manifest and tars) in the catalog; idempotent."""
    out_dir = Path(out_dir).resolve()
    shard_rows, sample_rows = read_output_index(out_dir)
    shards_tbl = schema.to_table("shards", shard_rows)
    samples_tbl = schema.to_table("shard_samples", sample_rows)
    want_shards = {tuple(r[n] for n in schema.SHARDS.names) for r in shards_tbl.to_pylist()}
    want_samples = {tuple(r[n] for n in schema.SHARD_SAMPLES.names) for r in samples_tbl.to_pylist()}
    output = str(out_dir)
    con = open_catalog(db_path)
    try:
        have_shards, have_samples = output_rows(con, output)
        if (have_shards, have_samples) == (want_shards, want_samples):
            return IndexResult(output, False, len(shard_rows), len(sample_rows))
        con.execute("BEGIN TRANSACTION")
        try:
            con.execute("DELETE FROM shards WHERE output = ?", [output])
            con.execute("DELETE FROM shard_samples WHERE output = ?", [output])
            append_rows(con, "shards", shards_tbl)
            append_rows(con, "shard_samples", samples_tbl)
            con.execute("COMMIT")
        except duckdb.Error:
            con.execute("ROLLBACK")
            raise
        return IndexResult(output, True, len(shard_rows), len(sample_rows))
    finally:
        con.close()
