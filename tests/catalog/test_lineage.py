"""Training lineage in a real DuckDB catalog: checkpoints and checkpoint_clips answer which clips, thresholds
and captions a checkpoint saw, for a whole shard folder, for an SQL-selected subset, and per bucket."""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

from catalog.db import clip_ids_sha256, open_catalog, register_checkpoint, register_run
from catalog.shard_index import select_clips
from pipeline.shards import ShardConfig, build_shards

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/shard_fixtures.py, shared by the shard tests
from shard_fixtures import SMALL_BUCKETS, make_library, write_run

FAST = ShardConfig(preset="ultrafast", maxcount=2)
HQ = "aesthetic_mean >= 6.0 AND width > 64"  # tiny.mp4 (64x64) would fit no bucket


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("lineage")
    videos, clips = make_library(root / "raw")
    db = root / "catalog.duckdb"
    register_run(db, write_run(root / "run", videos, clips))
    for name, where in (("all", "true"), ("hq", HQ)):
        build_shards(select_clips(db, where), root / name, where=where, buckets=SMALL_BUCKETS, shards=FAST)
    return db, root


def _query(db: Path, sql: str, params: list | None = None) -> list[tuple]:
    con = open_catalog(db, read_only=True)
    try:
        return con.execute(sql, params or []).fetchall()
    finally:
        con.close()


def _buckets(folder: Path) -> list[str]:
    return sorted(json.loads((folder / "manifest.json").read_text())["buckets"])


def test_a_checkpoint_records_its_run_config_and_the_clips_of_its_shards(catalog) -> None:
    db, root = catalog
    ckpt = root / "runs" / "vae_stage1" / "checkpoint_000010"
    rec = register_checkpoint(db, checkpoint=ckpt, run="vae_stage1", stage="vae_stage1", kind="vae", step=10,
                              config={"train": {"steps": 10}}, shards_output=root / "all", buckets=_buckets(root / "all"),
                              metrics={"loss": 0.5})
    row = _query(db, "SELECT run, stage, kind, step, selection, shard_manifest_sha256, metrics, config "
                     "FROM checkpoints WHERE checkpoint = ?", [str(ckpt.resolve())])
    manifest_sha = hashlib.sha256((root / "all" / "manifest.json").read_bytes()).hexdigest()
    assert row == [("vae_stage1", "vae_stage1", "vae", 10, "true", manifest_sha, '{"loss": 0.5}',
                    '{"train": {"steps": 10}}')]
    # Exactly the clips in that folder's shard_samples, which jobs.shards' writer put there.
    trained = _query(db, "SELECT clip_id, bucket FROM checkpoint_clips WHERE checkpoint = ? ORDER BY ALL",
                     [str(ckpt.resolve())])
    in_shards = _query(db, "SELECT clip_id, bucket FROM shard_samples WHERE output = ? ORDER BY ALL",
                       [str((root / "all").resolve())])
    assert trained == in_shards and rec.clips == len(trained) and len(trained) >= 4
    # What an analyst asks: which videos and captions the checkpoint saw.
    captions = _query(db, "SELECT DISTINCT c.caption FROM checkpoint_clips k JOIN clips c USING (clip_id) "
                          "WHERE k.checkpoint = ? ORDER BY 1", [str(ckpt.resolve())])
    assert ("a still grey disc",) in captions and all(c[0] for c in captions)


def test_a_sql_selected_stage_trained_on_exactly_the_predicates_rows(catalog) -> None:
    db, root = catalog
    selected = sorted(r["clip_id"] for r in select_clips(db, HQ))
    ckpt = root / "runs" / "dit_hq" / "checkpoint_000004"
    register_checkpoint(db, checkpoint=ckpt, run="dit_hq", stage="dit_hq", kind="dit", step=4, config={},
                        shards_output=root / "hq", buckets=_buckets(root / "hq"), init_from=root / "runs" / "dit",
                        selection=HQ, selection_rows=len(selected), selection_sha256=clip_ids_sha256(selected))
    trained = [r[0] for r in _query(db, "SELECT DISTINCT clip_id FROM checkpoint_clips WHERE checkpoint = ? ORDER BY 1",
                                    [str(ckpt.resolve())])]
    # Checked against a fresh query of the catalog (clips that fit no bucket never reach a shard).
    fresh = [r[0] for r in _query(db, f"SELECT clip_id FROM kept_clips WHERE {HQ} ORDER BY 1")]
    assert trained == fresh == selected and len(selected) >= 2
    row = _query(db, "SELECT selection, selection_rows, selection_sha256, init_from FROM checkpoints "
                     "WHERE checkpoint = ?", [str(ckpt.resolve())])[0]
    assert row == (HQ, len(fresh), hashlib.sha256("\n".join(fresh).encode()).hexdigest(),
                   str((root / "runs" / "dit").resolve()))


def test_only_the_buckets_a_stage_drew_from_count_and_registering_again_replaces(catalog) -> None:
    db, root = catalog
    images = [b for b in _buckets(root / "all") if b.startswith("1x")]
    ckpt = root / "runs" / "img" / "checkpoint_000001"
    for _ in range(2):
        rec = register_checkpoint(db, checkpoint=ckpt, run="img", stage="dit", kind="dit", step=1, config={},
                                  shards_output=root / "all", buckets=images)
    rows = _query(db, "SELECT bucket, count(*) FROM checkpoint_clips WHERE checkpoint = ? GROUP BY 1",
                  [str(ckpt.resolve())])
    assert rows == [(images[0], 1)] and rec.clips == 1
    assert _query(db, "SELECT count(*) FROM checkpoints WHERE checkpoint = ?", [str(ckpt.resolve())]) == [(1,)]
    with pytest.raises(ValueError, match=r"buckets \['5x16x16'\]: not in"):
        register_checkpoint(db, checkpoint=ckpt, run="img", stage="dit", kind="dit", step=1, config={},
                            shards_output=root / "all", buckets=["5x16x16"])
