"""Every path under the input ends as a row, and no input can stop a run (issue 12, items 1, 2, 4, 5).

The fast tests check the listing, the CPU stage's isolation, its streaming split and the pixel limit without Ray;
the slow ones run the curation job once over a folder of odd and broken inputs (CPU stage only, no models), and a
crash + changed input + resume.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import socket
from pathlib import Path

import av
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from catalog.schema import SKIP_REASONS
from pipeline import analyze, media
from pipeline.analyze import ClipResult, VideoResult, analyze_video, iter_analyze, shown, uri_key
from pipeline.run import scan_inputs
from pipeline.sample import write_bad_inputs
from pipeline.scenecut import SceneCutConfig
from pipeline.settings import CurateConfig, DecodeConfig, PrefilterConfig, RunConfig

BAD_NAME = os.fsdecode(b"caf\xe9 \xff.mp4")  # Latin-1 bytes: not UTF-8
EXTS = RunConfig().extensions


def _video(path: Path, n: int, *, w: int = 96, h: int = 64, codec: str = "libx264", fps: int = 10, seed: int = 0,
           pix_fmt: str = "yuv420p", keyint: int = 0, faststart: bool = False) -> Path:
    """A panning noise texture (sharp, moving, one shot); single-threaded encoders: the same bytes every run."""
    rng = np.random.default_rng(seed)
    texture = rng.integers(0, 255, (h, w + 3 * n, 3), dtype=np.uint8)
    with av.open(str(path), "w", options={"movflags": "faststart"} if faststart else {}) as container:
        opts = {"x264-params": f"keyint={keyint}:min-keyint={keyint}:scenecut=0"} if keyint else {}
        stream = container.add_stream(codec, rate=fps, options=opts)
        stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
        stream.codec_context.thread_count = 1
        if codec == "mpeg4":
            stream.codec_context.options = {"qscale": "2"}
        for i in range(n):
            rgb = np.ascontiguousarray(texture[:, 3 * i:3 * i + w])
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode())
    return path


def _zero_packet(src: Path, dst: Path, frame: int) -> Path:
    """``src`` with display frame ``frame``'s packet zeroed (a bad sector in the middle)."""
    with av.open(str(src)) as container:
        packets = sorted((p.pts, p.pos, p.size) for p in container.demux(video=0) if p.size)
    _, pos, size = packets[frame]
    data = bytearray(src.read_bytes())
    data[pos:pos + size] = bytes(size)
    dst.write_bytes(bytes(data))
    return dst


def _image_bytes(fmt: str, size=(80, 60), seed: int = 1, **kw) -> bytes:
    rgb = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format=fmt, **kw)
    return buf.getvalue()


def _gif(path: Path, n: int = 30) -> Path:
    rng = np.random.default_rng(3)
    texture = rng.integers(0, 255, (48, 64 + 3 * n, 3), dtype=np.uint8)
    frames = [Image.fromarray(np.ascontiguousarray(texture[:, 3 * i:3 * i + 64])) for i in range(n)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return path


def good_files(root: Path) -> dict[str, Path]:
    """The good inputs, by name (a run of these alone is the reference for the mixed folder)."""
    root.mkdir(parents=True, exist_ok=True)
    out = {"good_a.mp4": _video(root / "good_a.mp4", 30, seed=1),
           "good_b.webm": _video(root / "good_b.webm", 30, codec="libvpx", seed=2)}
    for name, fmt in (("still.png", "PNG"), ("still.jpg", "JPEG")):
        (root / name).write_bytes(_image_bytes(fmt, seed=len(name)))
        out[name] = root / name
    return out


def build_odd_folder(root: Path, good: Path | None = None) -> dict[str, tuple[str, str]]:
    """A folder of odd and broken inputs plus good ones (copies of those in ``good``, else generated). Returns
    relative name -> (table, reason) where table is videos, rejects or skipped and reason the reject stage or the
    skip reason ('' for videos)."""
    expect: dict[str, tuple[str, str]] = {}
    if good is None:
        names = list(good_files(root))
    else:
        names = [p.name for p in good.iterdir()]
        for n in names:
            shutil.copyfile(good / n, root / n)
    for name in names:
        expect[name] = ("videos", "")
    (root / "nested" / "deeper").mkdir(parents=True)
    (root / "empty_folder").mkdir()
    _video(root / "nested" / "deeper" / "inner.mp4", 30, seed=4)
    _video(root / "UPPER.MP4", 30, seed=5)
    _video(root / BAD_NAME, 30, seed=6)
    _video(root / "odd_161x121.avi", 30, w=161, h=121, codec="mpeg4", seed=7)
    _video(root / "odd_97x64.mkv", 30, w=97, h=64, codec="ffv1", seed=8)
    _video(root / "h264_444_161x121.mp4", 30, w=161, h=121, pix_fmt="yuv444p", seed=9)
    clean = _video(root.parent / f"{root.name}_clean.mp4", 240, w=160, h=120, fps=30, keyint=15, seed=10)
    _zero_packet(clean, root / "damaged.mp4", 121)
    whole = _video(root.parent / f"{root.name}_whole.mp4", 150, w=160, h=120, fps=30, keyint=15, seed=11,
                   faststart=True)
    data = whole.read_bytes()
    (root / "truncated_indexed.mp4").write_bytes(data[: len(data) * 3 // 5])
    _gif(root / "animated.gif")
    (root / "png_named.mp4").write_bytes(_image_bytes("PNG", seed=12))
    (root / "photo.avif").write_bytes(_image_bytes("AVIF", seed=13))
    (root / "photo16.png").write_bytes(_png16())
    expect.update({n: ("videos", "") for n in (
        "nested/deeper/inner.mp4", "UPPER.MP4", BAD_NAME, "odd_161x121.avi", "odd_97x64.mkv",
        "h264_444_161x121.mp4", "damaged.mp4", "truncated_indexed.mp4", "animated.gif", "png_named.mp4",
        "photo.avif", "photo16.png")})

    for kind, path in write_bad_inputs(root / "bad").items():
        expect[f"bad/{path.name}"] = ("rejects", "probe")
    (root / "fake.heic").write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(200))
    (root / "text_named.jpg").write_text("not a picture\n" * 10)
    (root / "text_named.gif").write_text("GIF? no.\n" * 10)
    shutil.copyfile(root / "good_a.mp4", root / "zz_copy_of_good_a.mp4")  # same bytes: a dedup reject
    os.symlink("good_a.mp4", root / "zz_link_to_good_a.mp4")            # a link to a file is that file
    _video(root / "vanishing.mp4", 30, seed=14)                          # deleted after listing (hook)
    expect.update({"fake.heic": ("rejects", "probe"), "text_named.jpg": ("rejects", "probe"),
                   "text_named.gif": ("rejects", "probe"), "zz_copy_of_good_a.mp4": ("rejects", "dedup"),
                   "zz_link_to_good_a.mp4": ("rejects", "dedup"), "vanishing.mp4": ("rejects", "read")})

    os.symlink("no_such_target.mp4", root / "broken_link.mp4")
    os.symlink("loop_b.mp4", root / "loop_a.mp4")
    os.symlink("loop_a.mp4", root / "loop_b.mp4")
    os.symlink("self.mp4", root / "self.mp4")
    os.symlink("nested", root / "link_to_folder")
    os.mkfifo(root / "fifo.mp4")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / "sock.mp4"))
    sock.close()
    (root / ".hidden.mp4").write_bytes((root / "good_a.mp4").read_bytes())
    (root / ".cache").mkdir()
    (root / ".cache" / "inside.mp4").write_bytes(b"x")
    (root / "notes.txt").write_text("notes\n")
    (root / "README").write_text("readme\n")
    (root / "clip.mp4.part").write_bytes(b"\x00" * 10)
    expect.update({"broken_link.mp4": ("skipped", "broken_symlink"), "loop_a.mp4": ("skipped", "symlink_loop"),
                   "loop_b.mp4": ("skipped", "symlink_loop"), "self.mp4": ("skipped", "symlink_loop"),
                   "link_to_folder": ("skipped", "not_a_file"), "fifo.mp4": ("skipped", "not_a_file"),
                   "sock.mp4": ("skipped", "not_a_file"), ".hidden.mp4": ("skipped", "hidden"),
                   ".cache/inside.mp4": ("skipped", "hidden"), "notes.txt": ("skipped", "extension"),
                   "README": ("skipped", "extension"), "clip.mp4.part": ("skipped", "extension")})
    return expect


def _png16() -> bytes:
    ramp = np.tile(np.linspace(0, 65535, 80).astype(np.uint16), (60, 1))
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, format="PNG")  # uint16 -> mode I;16
    return buf.getvalue()


def _every_entry(root: Path) -> set[str]:
    """Relative names of every directory entry under ``root`` that is not a directory (links not followed)."""
    names = set()
    for folder, dirs, files in os.walk(root):
        for n in files + [d for d in dirs if os.path.islink(os.path.join(folder, d))]:
            names.add(os.path.relpath(os.path.join(folder, n), root))
    return names


# ---------------------------------------------------------------------------------------------------------
# fast: no Ray


def test_listing_gives_every_non_media_entry_its_reason(tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    expect = build_odd_folder(root)
    files, skipped = scan_inputs(root, EXTS)
    listed = {os.path.relpath(f, root) for f in files}
    reasons = {os.path.relpath(k.uri, root): k.reason for k in skipped}
    assert listed.isdisjoint(reasons)
    assert listed | set(reasons) == _every_entry(root) == set(expect)  # nothing falls through
    assert reasons == {n: r for n, (t, r) in expect.items() if t == "skipped"}
    assert set(reasons.values()) <= set(SKIP_REASONS)
    assert BAD_NAME in listed and files == sorted(files, key=lambda p: Path(p).parts)
    row = next(k for k in skipped if k.reason == "broken_symlink").row()
    assert row["detail"] == "-> no_such_target.mp4"


def test_undecodable_name_has_a_key_and_is_shown_escaped():
    assert uri_key(BAD_NAME) != uri_key("caf .mp4") and len(uri_key(BAD_NAME)) == 16
    assert shown(BAD_NAME) == "caf\\xe9 \\xff.mp4"
    assert shown("naïve.mp4") == "naïve.mp4"  # valid UTF-8 is left alone
    assert uri_key("a.mp4") == uri_key(shown("a.mp4"))


@pytest.mark.parametrize("scorer", ["sharpness", "motion"])
def test_a_failure_in_a_scoring_thread_becomes_that_clips_reason(tmp_path, monkeypatch, scorer):
    # Clips are scored in a worker thread; those scored after the decode has ended run their motion in a second one.
    path = _video(tmp_path / "v.mp4", 30)

    def broken(*args, **kwargs):
        raise RuntimeError(f"{scorer} exploded")

    monkeypatch.setattr(analyze, scorer, broken)
    res = analyze_video(str(path), DecodeConfig(), SceneCutConfig(), PrefilterConfig())
    assert res.reject is None and res.clips
    for c in res.clips:
        assert c.record["reject_reasons"] == [f"score_failed: RuntimeError: {scorer} exploded"]
        assert c.frames is None


def test_an_unexpected_error_anywhere_is_a_reject_not_a_crash(tmp_path, monkeypatch):
    path = _video(tmp_path / "v.mp4", 30)

    def broken(*a, **k):
        raise KeyError("boom")

    monkeypatch.setattr(analyze, "CutDetector", broken)
    res = analyze_video(str(path), DecodeConfig(), SceneCutConfig(), PrefilterConfig())
    assert res.reject is not None and res.reject["stage"] == "analyze" and res.reject["error_class"] == "KeyError"


def test_a_long_single_shot_is_split_while_it_streams(tmp_path, monkeypatch):
    n, fps = 400, 10  # 40 s of one shot; clips at most 10 s
    path = _video(tmp_path / "long.mp4", n, w=64, h=48, fps=fps)
    held = []  # analysis frames handed over with each scored span: what the analysis had to keep for it
    real = analyze._score_span

    def recording(info, video_id, start, end, fps_, scene, *rest):
        held.append(len(scene))
        return real(info, video_id, start, end, fps_, scene, *rest)

    monkeypatch.setattr(analyze, "_score_span", recording)
    scenecut, decode = SceneCutConfig(), DecodeConfig()
    items = list(iter_analyze(str(path), decode, scenecut, PrefilterConfig(motion_min=None)))
    video = items[-1]
    assert isinstance(video, VideoResult) and video.reject is None
    spans = [(c.record["start_frame"], c.record["end_frame"]) for c in items[:-1]]
    assert video.video["num_clips"] == len(spans) and video.video["cut_frames"] == []
    max_len = scenecut.max_clip_s * fps
    trim = round(scenecut.trim_s * fps)
    kept_per_frame = decode.analysis_fps / fps
    # Held frames are bounded by a few clips, not by the shot (the whole shot is n * kept_per_frame = 160).
    assert max(held) <= (analyze.STREAM_SPLIT_CLIPS + 1) * max_len * kept_per_frame < n * kept_per_frame
    assert all(e - s <= max_len for s, e in spans)
    assert spans[0][0] == trim and spans[-1][1] == n - trim
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # no frame lost at a streamed split


def test_max_pixels_rejects_a_video_before_decoding_it(tmp_path):
    path = _video(tmp_path / "v.mp4", 30)  # 96x64 = 6144 px
    res = analyze_video(str(path), DecodeConfig(max_pixels=6000), SceneCutConfig(), PrefilterConfig())
    assert res.reject["stage"] == "probe" and res.reject["error_class"] == "UnsupportedSizeError"
    assert "at most 6000 pixels, got 96x64" in res.reject["message"]
    ok = analyze_video(str(path), DecodeConfig(max_pixels=6144), SceneCutConfig(), PrefilterConfig())
    assert ok.reject is None and ok.clips


def test_a_file_gone_before_its_analysis_is_a_read_reject(tmp_path):
    res = analyze_video(str(tmp_path / "gone.mp4"), DecodeConfig(), SceneCutConfig(), PrefilterConfig())
    assert res.reject["stage"] == "read" and res.reject["error_class"] == "FileNotFoundError"


# ---------------------------------------------------------------------------------------------------------
# slow: the curation job (in-process Ray, CPU stage only)


@pytest.fixture(scope="module")
def ray_local():
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    if started:
        ray.shutdown()


def _cfg(inp: Path, out: Path) -> CurateConfig:
    return CurateConfig.load(None, {"run": {"input": str(inp), "output": str(out), "stages": []},
                                    "ray": {"address": "local"}})


def _table(out: Path, name: str) -> list[dict]:
    return pq.read_table(out / f"{name}.parquet").to_pylist()


@pytest.fixture(scope="module")
def odd_run(ray_local, tmp_path_factory):
    from pipeline.run import curate

    base = tmp_path_factory.mktemp("accounting")
    root = base / "in"
    root.mkdir()
    good_files(base / "good")
    expect = build_odd_folder(root, base / "good")
    entries = _every_entry(root)
    deleted = []

    def delete_one(uris):  # a file removed while the run goes on
        victim = next(u for u in uris if u.endswith("vanishing.mp4"))
        os.unlink(victim)
        deleted.append(victim)

    summary = curate(_cfg(root, base / "out"), after_listing=delete_one)
    ref = curate(_cfg(base / "good", base / "good_out"))
    return {"root": root, "out": summary.output, "expect": expect, "entries": entries, "summary": summary,
            "deleted": deleted, "ref": ref.output}


@pytest.mark.slow
def test_every_entry_is_in_videos_rejects_or_skipped(odd_run):
    root, out, expect = odd_run["root"], odd_run["out"], odd_run["expect"]
    assert odd_run["deleted"] and len(odd_run["entries"]) >= 30
    found: dict[str, tuple[str, str]] = {}
    for table, reason_key in (("videos", None), ("rejects", "stage"), ("skipped", "reason")):
        for r in _table(out, table):
            name = os.path.relpath(r["uri"], shown(str(root)))
            assert name not in found, f"{name} in {found[name][0]} and {table}"
            found[name] = (table, r[reason_key] if reason_key else "")
    want = {shown(n): v for n, v in expect.items()}
    assert found == want
    assert set(want) == {shown(n) for n in odd_run["entries"]}  # every directory entry, nothing more
    counts = odd_run["summary"].counts
    assert counts["skipped"] == sum(1 for t, _ in expect.values() if t == "skipped")
    run_ids = {r["run_id"] for r in _table(out, "runs")}
    assert all(r["run_id"] in run_ids for t in ("videos", "clips", "rejects", "skipped") for r in _table(out, t))


@pytest.mark.slow
def test_broken_inputs_say_why(odd_run):
    out, root = odd_run["out"], shown(str(odd_run["root"]))
    rejects = {os.path.relpath(r["uri"], root): r for r in _table(out, "rejects")}
    assert rejects["vanishing.mp4"]["error_class"] == "FileNotFoundError"
    assert rejects["fake.heic"]["error_class"] in ("UnsupportedFormatError", "NotMediaError")
    assert "good_a.mp4" in rejects["zz_copy_of_good_a.mp4"]["message"]
    skipped = {os.path.relpath(r["uri"], root): r for r in _table(out, "skipped")}
    assert skipped["fifo.mp4"]["detail"] == "FIFO" and skipped["sock.mp4"]["detail"] == "socket"
    assert skipped["notes.txt"]["detail"] == ".txt"


@pytest.mark.slow
def test_odd_sizes_damage_and_undecodable_names_keep_their_clips(odd_run):
    out, root = odd_run["out"], shown(str(odd_run["root"]))
    videos = {os.path.relpath(v["uri"], root): v for v in _table(out, "videos")}
    clips_by_video: dict[str, list[dict]] = {}
    for c in _table(out, "clips"):
        clips_by_video.setdefault(c["video_id"], []).append(c)
    for name in ("odd_161x121.avi", "odd_97x64.mkv", "h264_444_161x121.mp4", shown(BAD_NAME)):
        assert clips_by_video.get(videos[name]["video_id"]), f"{name} has no clips"
    assert (videos["odd_161x121.avi"]["width"], videos["odd_161x121.avi"]["height"]) == (161, 121)
    assert videos[shown(BAD_NAME)]["uri"].endswith("caf\\xe9 \\xff.mp4")
    damaged = videos["damaged.mp4"]
    (start, end), = damaged["damaged_frames"]
    assert start <= 121 < end
    spans = [(c["start_frame"], c["end_frame"]) for c in clips_by_video[damaged["video_id"]]]
    assert any(e <= start for _, e in spans) and all(e <= start or s >= end for s, e in spans)
    head = videos["truncated_indexed.mp4"]  # cut at 3/5 with its index intact: the head decodes
    assert head["damaged_frames"] and clips_by_video[head["video_id"]]
    assert all(e <= head["damaged_frames"][0][0] for s, e in
               [(c["start_frame"], c["end_frame"]) for c in clips_by_video[head["video_id"]]])
    assert videos["good_a.mp4"]["damaged_frames"] == []
    assert videos["animated.gif"]["is_image"] is False and clips_by_video[videos["animated.gif"]["video_id"]]


@pytest.mark.slow
def test_good_files_come_out_as_without_the_bad_ones(odd_run):
    def rows(out, table, names=None):
        got = []
        for r in _table(out, table):
            if names is not None and Path(r["uri"]).name not in names:
                continue
            got.append({k: v for k, v in r.items() if k not in ("run_id", "uri", "probe_seconds")})
        return sorted(got, key=lambda r: str(r.get("clip_id") or r["video_id"]))

    ref = odd_run["ref"]
    names = {Path(v["uri"]).name for v in _table(ref, "videos")}
    assert names == {"good_a.mp4", "good_b.webm", "still.png", "still.jpg"} and not _table(ref, "rejects")
    mixed_videos = [v for v in rows(odd_run["out"], "videos", names)]
    assert mixed_videos == rows(ref, "videos")
    ids = {v["video_id"] for v in mixed_videos}
    assert [c for c in rows(odd_run["out"], "clips") if c["video_id"] in ids] == rows(ref, "clips")


@pytest.mark.slow
def test_skipped_entries_are_in_the_catalog_and_its_report(odd_run, tmp_path):
    from catalog.db import open_catalog, register_run
    from catalog.report import write_report

    db = tmp_path / "catalog.duckdb"
    register_run(db, odd_run["out"])
    con = open_catalog(db, read_only=True)
    try:
        by_reason = dict(con.execute("SELECT reason, count(*) FROM skipped GROUP BY reason").fetchall())
    finally:
        con.close()
    want: dict[str, int] = {}
    for t, r in odd_run["expect"].values():
        if t == "skipped":
            want[r] = want.get(r, 0) + 1
    assert by_reason == want
    write_report(db, tmp_path / "report.html")
    page = (tmp_path / "report.html").read_text()
    assert "entries skipped, not media" in page and "symlink_loop" in page


@pytest.mark.slow
def test_crash_then_changed_input_then_resume_leaves_no_orphan_run_ids(ray_local, tmp_path):
    from catalog.db import open_catalog, register_run
    from pipeline.run import curate

    root = tmp_path / "in"
    good_files(root)
    cfg = _cfg(root, tmp_path / "out")

    class Killed(Exception):
        pass

    def die_after_first(done, total, uri, status):
        raise Killed(uri)

    with pytest.raises(Killed):
        curate(cfg, progress=die_after_first)
    parts = list((tmp_path / "out" / "_parts" / "done").glob("*.json"))
    assert len(parts) == 1  # one input finished before the "crash"
    finished = json.loads(parts[0].read_text())["uri"]
    gone = next(p for p in sorted(root.iterdir()) if str(p) != finished)
    gone.unlink()                                       # the input list changes before the resume
    _video(root / "new.mp4", 30, seed=20)
    resumed = curate(cfg)
    out = resumed.output
    runs = _table(out, "runs")
    run_ids = {r["run_id"] for r in runs}
    assert len(run_ids) == 2 and resumed.run_id in run_ids  # the crashed attempt has its row too
    for table in ("videos", "clips", "rejects", "skipped"):
        for r in _table(out, table):
            assert r["run_id"] in run_ids, (table, r)
    assert resumed.counts["resumed_skipped"] == 1 and resumed.counts["processed_now"] == 3
    db = tmp_path / "catalog.duckdb"
    register_run(db, out)
    con = open_catalog(db, read_only=True)
    try:
        orphans = con.execute("SELECT count(*) FROM clips WHERE run_id NOT IN (SELECT run_id FROM runs)").fetchone()
        standin = con.execute("SELECT bool_and(standin_models), count(*) FROM clip_verdicts").fetchone()
    finally:
        con.close()
    assert orphans == (0,) and standin[0] is True and standin[1] == resumed.counts["clips"]
