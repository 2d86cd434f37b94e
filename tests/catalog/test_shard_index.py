"""The shard index in a real DuckDB catalog: SQL selection, shards/shard_samples rows, idempotence."""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import webdataset as wds

from catalog.db import open_catalog, register_run
from catalog.shard_index import SelectionError, register_output, select_clips
from pipeline.shards import ShardConfig, build_shards

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/shard_fixtures.py, shared by the shard tests
from shard_fixtures import SMALL_BUCKETS, make_library, write_run

FAST = ShardConfig(preset="ultrafast", maxcount=1)


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("cat")
    videos, clips = make_library(root / "raw")
    register_run(root / "catalog.duckdb", write_run(root / "run", videos, clips))
    return root / "catalog.duckdb", clips


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _query(db: Path, sql: str, params: list | None = None) -> list[tuple]:
    con = open_catalog(db, read_only=True)
    try:
        return con.execute(sql, params or []).fetchall()
    finally:
        con.close()


def test_selection_is_kept_clips_matching_the_where(catalog):
    db, clips = catalog
    before = _digest(db)
    rows = select_clips(db, "aesthetic_mean >= 5.0 AND NOT is_image")
    # land.mp4's first clip (aesthetic 4.0) is not even kept; the image is excluded by the WHERE.
    want = sorted(c["clip_id"] for c in clips if c["aesthetic_mean"] >= 5.0 and not c["is_image"])
    assert [r["clip_id"] for r in rows] == want
    assert all(Path(r["video_uri"]).is_file() for r in rows)
    assert _digest(db) == before


@pytest.mark.parametrize(
    ("where", "fragment"),
    [
        ("no_such_column > 1", "no_such_column"),
        ("aesthetic_mean >=", "syntax error"),
        ("true; DELETE FROM thresholds", "single SELECT"),
        ("false) UNION ALL (SELECT * FROM clips WHERE true", "syntax error"),
        ("", "expected a WHERE condition"),
    ],
)
def test_bad_where_is_a_clear_error_and_the_file_is_unchanged(catalog, where, fragment):
    db, _ = catalog
    before = _digest(db)
    with pytest.raises(SelectionError, match=fragment) as info:
        select_clips(db, where)
    assert repr(where) in str(info.value) or not where
    assert _digest(db) == before
    assert _query(db, "SELECT count(*) FROM thresholds")[0][0] > 0


def test_registered_shards_join_back_to_their_source(catalog, tmp_path):
    db, _ = catalog
    where = "aesthetic_mean >= 5.0"
    out = tmp_path / "shards"
    manifest = build_shards(select_clips(db, where), out, where=where, buckets=SMALL_BUCKETS, shards=FAST).manifest
    first = register_output(db, out)
    assert first.changed and first.samples == manifest["samples"] and first.shards == manifest["shards"]

    samples = list(wds.WebDataset(sorted(str(p) for p in out.glob("*/*.tar")), shardshuffle=False))
    output = str(out.resolve())
    assert _query(db, "SELECT count(*) FROM shard_samples WHERE output = ?", [output])[0][0] == len(samples)
    assert _query(db, "SELECT count(*), sum(num_samples) FROM shards WHERE output = ?", [output])[0] == (
        len(list(out.glob("*/*.tar"))), len(samples))
    captions = dict(_query(db, "SELECT clip_id, caption FROM clips"))
    for s in samples:
        meta = json.loads(s["json"])
        assert s["txt"].decode() == captions[meta["clip_id"]]
        (key, shard, bucket), = _query(db, "SELECT key, shard, bucket FROM shard_samples WHERE clip_id = ?",
                                       [meta["clip_id"]])
        assert key == s["__key__"] and bucket == meta["bucket"] and s["__url__"].endswith(shard)
    # SQL joins training data back to its source file and scores.
    joined = _query(db, """
        SELECT s.bucket, v.uri, c.aesthetic_mean FROM shard_samples s
        JOIN clips c USING (clip_id) JOIN videos v ON v.video_id = c.video_id
        JOIN shards t ON t.shard = s.shard AND t.output = s.output
        WHERE s.output = ? ORDER BY s.key""", [output])
    assert len(joined) == len(samples) and all(a >= 5.0 and Path(u).is_file() for _, u, a in joined)

    before = _digest(db)
    again = register_output(db, out)
    assert not again.changed and _digest(db) == before


def test_rebuilt_output_replaces_its_rows_only(catalog, tmp_path):
    db, _ = catalog
    a, b = tmp_path / "a", tmp_path / "b"
    for out, where in ((a, "true"), (b, "is_image")):
        build_shards(select_clips(db, where), out, where=where, buckets=SMALL_BUCKETS, shards=FAST)
        register_output(db, out)
    count = "SELECT count(*) FROM shard_samples WHERE output = ?"
    n_a, n_b = (_query(db, count, [str(p.resolve())])[0][0] for p in (a, b))
    assert n_b == 1 and n_a > n_b
    build_shards(select_clips(db, "is_image"), a, where="is_image", buckets=SMALL_BUCKETS, shards=FAST,
                 overwrite=True)
    assert register_output(db, a).changed
    assert _query(db, count, [str(a.resolve())])[0][0] == 1
    assert _query(db, count, [str(b.resolve())])[0][0] == n_b
    assert _query(db, "SELECT count(*) FROM shards WHERE output = ?", [str(a.resolve())])[0][0] == 1
