"""The catalog on real DuckDB files: incremental registration, superseding, thresholds as data."""
from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from catalog import schema
from catalog.db import (
    THRESHOLD_RULES,
    RunFolderError,
    append_rows,
    open_catalog,
    register_run,
    set_threshold,
    thresholds,
)


def _dump(db: Path) -> dict[str, list]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        out = {}
        for t in ("videos_history", "clips_history", "rejects", "skipped", "runs", "thresholds", "_registrations"):
            out[t] = sorted(map(repr, con.execute(f"FROM {t}").to_arrow_table().to_pylist()))
        return out
    finally:
        con.close()


def test_user_facing_names_exist_before_any_run(tmp_path: Path) -> None:
    con = open_catalog(tmp_path / "c.duckdb")
    names = {r[0] for r in con.execute("SHOW TABLES").fetchall()}
    assert {"videos", "clips", "rejects", "runs", "thresholds", "kept_clips", "clip_verdicts", "shards",
            "shard_samples", "videos_history", "clips_history", "column_docs"} <= names
    # Joins against shard tables work before the shard job ever ran.
    assert con.execute("SELECT count(*) FROM kept_clips k LEFT JOIN shard_samples s USING (clip_id)").fetchone() == (0,)


def test_two_runs_registered_and_reregistration_is_a_noop(tmp_path: Path, two_runs: dict) -> None:
    db = tmp_path / "catalog.duckdb"
    folder_a, folder_b = two_runs["folders"]
    first = register_run(db, folder_a)
    assert first.changed and first.rows == {"videos": 3, "clips": 5, "rejects": 1, "skipped": 0, "runs": 1}
    second = register_run(db, folder_b)
    assert second.changed and second.run_ids == (two_runs["runs"][1],)

    before = _dump(db)
    again = register_run(db, folder_b)
    again_a = register_run(db, folder_a)
    assert not again.changed and not again_a.changed
    assert _dump(db) == before

    con = open_catalog(db, read_only=True)
    assert con.execute("SELECT count(*) FROM clips_history").fetchone() == (7,)
    assert con.execute("SELECT count(*), count(DISTINCT run_id) FROM runs").fetchone() == (2, 2)
    assert con.execute("SELECT count(*) FROM rejects").fetchone() == (1,)


def test_latest_run_supersedes_per_video_and_history_stays(registered: Path, two_runs: dict) -> None:
    ids = two_runs["ids"]
    run_a, run_b = two_runs["runs"]
    con = open_catalog(registered, read_only=True)
    clips = dict(con.execute("SELECT video_id, list(run_id ORDER BY clip_id) FROM clips GROUP BY 1").fetchall())
    # b was re-curated by run B into one clip; run A's two clips of b are no longer current.
    assert clips[ids["b"]] == [run_b]
    assert clips[ids["a"]] == [run_a, run_a]
    assert clips[ids["c"]] == [run_b]
    assert con.execute("SELECT count(*) FROM videos").fetchone() == (4,)
    assert con.execute("SELECT run_id FROM videos WHERE video_id = ?", [ids["b"]]).fetchall() == [(run_b,)]
    history = con.execute(
        "SELECT run_id, count(*) FROM clips_history WHERE video_id = ? GROUP BY 1 ORDER BY 1", [ids["b"]]
    ).fetchall()
    assert history == [(run_a, 2), (run_b, 1)]


def test_order_is_by_run_start_not_registration_order(tmp_path: Path, two_runs: dict) -> None:
    """Registering the older run last must not let it supersede the newer one."""
    db = tmp_path / "c.duckdb"
    folder_a, folder_b = two_runs["folders"]
    register_run(db, folder_b)
    register_run(db, folder_a)
    con = open_catalog(db, read_only=True)
    got = con.execute("SELECT DISTINCT run_id FROM clips WHERE video_id = ?", [two_runs["ids"]["b"]]).fetchall()
    assert got == [(two_runs["runs"][1],)]


def test_resumed_run_replaces_its_rows_without_duplicates(tmp_path: Path, rows) -> None:
    video_id_for, video_row, clip_row, run_row = rows.video_id_for, rows.video_row, rows.clip_row, rows.run_row
    write_run_folder, T0 = rows.write_run_folder, rows.T0
    vid = video_id_for("long.mp4")
    run = "runR000000000000"
    folder = tmp_path / "out"
    write_run_folder(folder, videos=[video_row(vid, run, uri="/raw/long.mp4")],
                     clips=[clip_row(vid, run, start=0, end=100)], rejects=[], runs=[run_row(run, T0)])
    db = tmp_path / "c.duckdb"
    register_run(db, folder)
    # The resumed attempt finished the video: two clips now, and a second runs row with the same run_id.
    write_run_folder(folder, videos=[video_row(vid, run, uri="/raw/long.mp4", num_clips=2)],
                     clips=[clip_row(vid, run, start=0, end=100), clip_row(vid, run, start=100, end=200)],
                     rejects=[], runs=[run_row(run, T0), run_row(run, T0 + timedelta(hours=1))])
    result = register_run(db, folder)
    assert result.changed and result.replaced["clips_history"] == 1
    con = open_catalog(db, read_only=True)
    assert con.execute("SELECT count(*), count(DISTINCT clip_id) FROM clips").fetchone() == (2, 2)
    assert con.execute("SELECT count(*) FROM runs").fetchone() == (2,)
    assert con.execute("SELECT count(*) FROM videos").fetchone() == (1,)


def test_kept_clips_follows_threshold_rows(registered: Path, two_runs: dict) -> None:
    ids = two_runs["ids"]
    con = open_catalog(registered)
    kept = lambda: {r[0] for r in con.execute("SELECT clip_id FROM kept_clips").fetchall()}  # noqa: E731
    assert kept() == {f"{ids['a']}:0-100", f"{ids['b']}:0-150", f"{ids['img']}:0-1"}

    set_threshold(con, "aesthetic_min", 5.5)  # only run B's b (6.1) is that good
    assert kept() == {f"{ids['b']}:0-150"}
    # Plain SQL on the table works the same as the helper.
    con.execute("UPDATE thresholds SET value = 3.0 WHERE name = 'aesthetic_min'")
    assert f"{ids['a']}:100-200" in kept()  # aesthetic 3.9 now passes
    # Curation rejects stay out however loose the thresholds: c was prefiltered and never scored.
    for rule in THRESHOLD_RULES:
        set_threshold(con, rule.name, None)
    assert f"{ids['c']}:0-30" not in kept()
    assert len(kept()) == 4


def test_null_scores_fail_and_images_skip_temporal_thresholds(tmp_path: Path, rows) -> None:
    video_id_for, video_row, clip_row, run_row = rows.video_id_for, rows.video_row, rows.clip_row, rows.run_row
    write_run_folder, T0 = rows.write_run_folder, rows.T0
    vid, img = video_id_for("v.mp4"), video_id_for("i.jpg")
    run = "runN000000000000"
    folder = write_run_folder(
        tmp_path / "out",
        videos=[video_row(vid, run, uri="/raw/v.mp4"), video_row(img, run, uri="/raw/i.jpg", is_image=True)],
        clips=[clip_row(vid, run, aesthetic=None),  # scored by cheap stages only, no reject reason recorded
               clip_row(img, run, start=0, end=1, is_image=True)],
        rejects=[], runs=[run_row(run, T0)],
    )
    db = tmp_path / "c.duckdb"
    register_run(db, folder)
    con = open_catalog(db)
    verdicts = dict(con.execute("SELECT clip_id, failed_thresholds FROM clip_verdicts").fetchall())
    assert verdicts[f"{vid}:0-100"] == ["aesthetic_min"]
    assert verdicts[f"{img}:0-1"] == []  # duration 0 and no motion, but an image has no time to judge
    set_threshold(con, "motion_min", 50.0)
    set_threshold(con, "sharpness_min", 0.7)
    verdicts = dict(con.execute("SELECT clip_id, failed_thresholds FROM clip_verdicts").fetchall())
    assert verdicts[f"{img}:0-1"] == ["sharpness_min"]  # sharpness applies to images, motion does not
    assert verdicts[f"{vid}:0-100"] == ["sharpness_min", "motion_min", "aesthetic_min"]


def test_model_thresholds_skip_standin_runs(tmp_path: Path, rows) -> None:
    """Random stand-in models give meaningless scores: their runs are judged on the cheap scores only."""
    vid = rows.video_id_for("s.mp4")
    run = "runS000000000000"
    folder = rows.write_run_folder(
        tmp_path / "out", videos=[rows.video_row(vid, run, uri="/raw/s.mp4")],
        clips=[rows.clip_row(vid, run, aesthetic=0.15, watermark=0.5, similarity=-0.01),
               rows.clip_row(vid, run, start=100, end=200, aesthetic=0.15, sharpness=0.1)],
        rejects=[], runs=[rows.run_row(run, rows.T0, standin_models=True)],
    )
    db = tmp_path / "c.duckdb"
    register_run(db, folder)
    con = open_catalog(db)
    verdicts = dict(con.execute("SELECT clip_id, failed_thresholds FROM clip_verdicts").fetchall())
    assert verdicts == {f"{vid}:0-100": [], f"{vid}:100-200": ["sharpness_min"]}
    assert con.execute("SELECT clip_id FROM kept_clips").fetchall() == [(f"{vid}:0-100",)]
    assert con.execute("SELECT bool_and(standin_models) FROM clip_verdicts").fetchone() == (True,)


def test_clip_verdicts_agree_with_kept_clips(registered: Path) -> None:
    con = open_catalog(registered)
    set_threshold(con, "motion_max", 10.0)
    kept = {r[0] for r in con.execute("SELECT clip_id FROM kept_clips").fetchall()}
    verdict_kept = {r[0] for r in con.execute("SELECT clip_id FROM clip_verdicts WHERE kept").fetchall()}
    assert kept == verdict_kept
    assert con.execute("SELECT count(*) FROM clip_verdicts").fetchone() == con.execute(
        "SELECT count(*) FROM clips").fetchone()


def test_thresholds_have_defaults_and_unknown_names_raise(tmp_path: Path) -> None:
    con = open_catalog(tmp_path / "c.duckdb")
    values = thresholds(con)
    assert values["aesthetic_min"] == 4.5 and values["duration_min"] == 2.0 and values["duration_max"] == 10.0
    assert values["motion_max"] is None  # off until a user picks it from the histogram
    assert 0.5 <= values["watermark_max"] <= 0.8
    with pytest.raises(KeyError, match="aesthetic_min"):
        set_threshold(con, "aesthetics_min", 5.0)
    with pytest.raises(ValueError, match="finite"):
        set_threshold(con, "aesthetic_min", float("nan"))


def test_columns_are_documented(registered: Path) -> None:
    con = open_catalog(registered, read_only=True)
    undocumented = con.execute(
        "SELECT table_name, column_name FROM column_docs WHERE comment IS NULL OR comment = ''"
    ).fetchall()
    assert undocumented == []
    doc = con.execute("SELECT comment FROM duckdb_columns() WHERE table_name = 'kept_clips' "
                      "AND column_name = 'aesthetic_mean'").fetchone()[0]
    assert "aesthetic" in doc.lower()
    assert con.execute("SELECT comment FROM duckdb_views() WHERE view_name = 'kept_clips'").fetchone()[0]


def test_types_match_schema(registered: Path) -> None:
    con = open_catalog(registered, read_only=True)
    for view, sch in (("clips", schema.CLIPS), ("videos", schema.VIDEOS), ("rejects", schema.REJECTS)):
        got = con.execute(f"SELECT * FROM {view} LIMIT 0").to_arrow_table()
        for field in sch:
            assert got.schema.field(field.name).type == field.type, (view, field.name)


def test_bad_run_folder_is_a_clear_error(tmp_path: Path, two_runs: dict) -> None:
    with pytest.raises(RunFolderError, match="does not exist"):
        register_run(tmp_path / "c.duckdb", tmp_path / "nope")
    folder = two_runs["folders"][0]
    (folder / "rejects.parquet").unlink()
    with pytest.raises(RunFolderError, match="rejects.parquet"):
        register_run(tmp_path / "c.duckdb", folder)
    table = schema.to_table("rejects", []).append_column("extra", schema.to_table("rejects", []).column("uri"))
    pq.write_table(table, folder / "rejects.parquet")
    with pytest.raises(RunFolderError, match="extra"):
        register_run(tmp_path / "c.duckdb", folder)


def test_a_failed_registration_changes_nothing(registered: Path, tmp_path: Path, rows) -> None:
    before = _dump(registered)
    vid, run = rows.video_id_for("bad.mp4"), "runX000000000000"
    folder = rows.write_run_folder(tmp_path / "bad", videos=[rows.video_row(vid, run, uri="/raw/bad.mp4")],
                                   clips=[rows.clip_row(vid, run)], rejects=[], runs=[rows.run_row(run, rows.T0)])
    # Another writer's file with a NULL clip_id (catalog.schema declares it NOT NULL).
    relaxed = pa.schema([f.with_nullable(True) for f in schema.CLIPS])
    table = pq.read_table(folder / "clips.parquet").cast(relaxed)
    table = table.set_column(0, relaxed.field(0), pa.array([None], pa.string()))
    pq.write_table(table, folder / "clips.parquet")
    with pytest.raises(RunFolderError) as err:
        register_run(registered, folder)
    assert "nothing was registered" in str(err.value) and "clip_id" in str(err.value)
    assert _dump(registered) == before


_KILLED_REGISTRATION = """
import os, sys
from catalog import db

real = db._replace_run_rows

def killed(con, *args, **kwargs):
    replaced = real(con, *args, **kwargs)
    con.execute("COMMIT")   # even a committed write to the copy must not reach the catalog
    con.execute("CHECKPOINT")
    os._exit(9)             # as kill -9 would: no cleanup, no rename

db._replace_run_rows = killed
db.register_run(sys.argv[1], sys.argv[2])
"""


def _register_killed(db: Path, folder: Path) -> int:
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    return subprocess.run([sys.executable, "-c", _KILLED_REGISTRATION, str(db), str(folder)], cwd=repo).returncode


def test_a_killed_registration_leaves_the_previous_catalog(tmp_path: Path, two_runs: dict) -> None:
    db = tmp_path / "catalog.duckdb"
    folder_a, folder_b = two_runs["folders"]
    assert _register_killed(db, folder_a) == 9
    assert not db.exists()  # a first registration killed leaves no half-made catalog behind
    register_run(db, folder_a)
    before = _dump(db)
    assert _register_killed(db, folder_b) == 9
    assert _dump(db) == before  # the previous catalog, byte for byte in every table
    again = register_run(db, folder_b)  # and the next registration completes over what the kill left
    assert again.changed and again.run_ids == (two_runs["runs"][1],)
    con = open_catalog(db, read_only=True)
    try:
        assert con.execute("SELECT count(*), count(DISTINCT run_id) FROM runs").fetchone() == (2, 2)
    finally:
        con.close()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".catalog.duckdb.registering")] == []


def test_skipped_rows_are_registered_and_optional(tmp_path: Path, two_runs: dict) -> None:
    folder_a, _ = two_runs["folders"]
    run_id = two_runs["runs"][0]
    db = tmp_path / "catalog.duckdb"
    register_run(db, folder_a)  # a run folder from before skipped.parquet existed
    rows = [{"uri": "/raw/notes.txt", "reason": "extension", "detail": ".txt", "run_id": run_id},
            {"uri": "/raw/fifo.mp4", "reason": "not_a_file", "detail": "FIFO", "run_id": run_id}]
    pq.write_table(schema.to_table("skipped", rows), folder_a / "skipped.parquet")
    result = register_run(db, folder_a)
    assert result.changed and result.rows["skipped"] == 2
    con = open_catalog(db, read_only=True)
    try:
        got = con.execute("SELECT uri, reason, detail, run_id FROM skipped ORDER BY uri").fetchall()
    finally:
        con.close()
    assert got == sorted((r["uri"], r["reason"], r["detail"], r["run_id"]) for r in rows)


def test_shard_rows_join_back_to_clips(registered: Path, two_runs: dict) -> None:
    ids = two_runs["ids"]
    con = open_catalog(registered)
    append_rows(con, "shards", [{"shard": "49x480x720/shard-000000.tar", "bucket": "49x480x720", "frames": 49,
                                 "height": 480, "width": 720, "fps": 8.0, "num_samples": 1, "bytes": 10_000,
                                 "output": "/out/shards", "selection": "true"}])
    append_rows(con, "shard_samples", [{"key": "000000", "clip_id": f"{ids['b']}:0-150", "video_id": ids["b"],
                                        "shard": "49x480x720/shard-000000.tar", "bucket": "49x480x720",
                                        "output": "/out/shards"}])
    got = con.execute("SELECT k.aesthetic_mean, s.bucket FROM kept_clips k JOIN shard_samples s USING (clip_id)"
                      ).fetchall()
    assert got == [(pytest.approx(6.1), "49x480x720")]
    with pytest.raises(ValueError, match="append_rows"):
        append_rows(con, "clips", [])
