"""The HTML report: built from a real catalog over real encoded videos, opened in headless Chromium.

The contact sheets come from the previews curation stored in clips.preview_jpeg: every test here deletes the source
media before the report is written.
"""
from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from catalog import schema
from catalog.cli import main
from catalog.db import append_rows, open_catalog, register_run, set_threshold
from catalog.report import SCORE_COLUMNS, ReportOptions, histogram_svg, write_report
from pipeline import media
from pipeline.analyze import PREVIEW_HEIGHT, preview_jpeg, uri_key
from pipeline.run import PartWriter, consolidate, make_run_id
from pipeline.settings import CurateConfig
from pipeline.stages import analyze_row

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/chromium.py, shared with the training page test
from chromium import CHROMIUM_FLAGS, chromium  # noqa: E402

MAGENTA = np.array([255, 0, 255])


def _write_video(path: Path, *, frames: int, size: tuple[int, int], color: tuple[int, int, int], step: int = 3) -> None:
    """A square of ``color`` sliding ``step`` px a frame over a grey gradient (jumping back at the edge), H.264
    single-threaded (byte-identical run to run)."""
    w, h = size
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=Fraction(25))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.thread_count = 1
        grad = np.tile(np.linspace(40, 200, w, dtype=np.uint8)[None, :, None], (h, 1, 3))
        side = h // 2
        for i in range(frames):
            img = grad.copy()
            x = (i * step) % (w - side)
            img[h // 4: h // 4 + side, x: x + side] = color
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def _embedded_images(page: str) -> list[np.ndarray]:
    """Every picture embedded in the page, decoded (RGB)."""
    uris = re.findall(r'src="data:image/jpeg;base64,([^"]+)"', page)
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(u))).convert("RGB")) for u in uris]


def _curate_cpu_stage(inputs: list[Path], out: Path, rows) -> Path:
    """Curate ``inputs`` as jobs.curate does up to the model stages: the CPU stage's rows through the run's part
    writer into the consolidated tables (no Ray, no models: their scores stay NULL, as for a stand-in run)."""
    uris = [str(p) for p in inputs]
    cfg = CurateConfig.load(None, {"run": {"output": str(out), "stages": []}})
    run_id = make_run_id(cfg, uris)
    writer = PartWriter(out, run_id, "scoring", {uri_key(u): u for u in uris})
    for uri in uris:
        for row in analyze_row({"uri": uri}, cfg):
            writer.add(row)
    assert not writer.pending
    consolidate(out, set(uris))
    pq.write_table(schema.to_table("runs", [rows.run_row(run_id, rows.T0, standin_models=True)]),
                   out / "runs.parquet")
    return out


def test_report_of_a_curated_run_needs_no_source(tmp_path: Path, rows) -> None:
    """Curate, delete every source, render: each card still shows its clip's frames, stored by curation."""
    raw = tmp_path / "raw"
    raw.mkdir()
    _write_video(raw / "magenta.mp4", frames=100, size=(192, 108), color=(255, 0, 255), step=1)  # no jump: one scene
    _write_video(raw / "cyan.mp4", frames=75, size=(108, 192), color=(0, 255, 255))
    img = np.zeros((120, 160, 3), np.uint8)
    img[:, :80] = MAGENTA
    Image.fromarray(img).save(raw / "photo.jpg", quality=95)
    out = _curate_cpu_stage(sorted(raw.iterdir()), tmp_path / "out", rows)
    db = tmp_path / "catalog.duckdb"
    register_run(db, out)
    shutil.rmtree(raw)

    summary = write_report(db, tmp_path / "report.html", ReportOptions(clips_per_sheet=10))
    page = summary.path.read_text()
    con = open_catalog(db, read_only=True)
    clips = con.execute("SELECT count(*), count(preview_jpeg) FROM clips").fetchone()
    con.close()
    cards = page.count('class="card kept"') + page.count('class="card rejected"')
    assert clips[0] == clips[1] >= 3 and cards == clips[0]  # every clip has a preview and is on a sheet
    assert (summary.thumbnails, summary.missing_previews) == (cards, 0)
    assert "no preview" not in page
    images = _embedded_images(page)
    assert len(images) == cards
    for picture in images:  # real frames: the stored height, and a scene, not a flat fill
        assert picture.shape[0] == PREVIEW_HEIGHT and picture.std() > 20

    def share_near(picture: np.ndarray, color: tuple[int, int, int], tol: int = 60) -> float:
        return float((np.abs(picture.astype(int) - np.array(color)).max(axis=2) <= tol).mean())

    # The photo's preview is one 4:3 frame, the portrait video's three 9:16 ones, the landscape video's three 16:9.
    photo, tall, wide = sorted(images, key=lambda p: p.shape[1] / p.shape[0])
    assert [p.shape[1] for p in (photo, tall, wide)] == [171, 3 * 72 + 6, 3 * 228 + 6]
    assert 0.4 < share_near(photo, (255, 0, 255)) < 0.6
    assert share_near(wide, (255, 0, 255)) > 0.05 and share_near(wide, (0, 255, 255)) < 0.01
    assert share_near(tall, (0, 255, 255)) > 0.05 and share_near(tall, (255, 0, 255)) < 0.01
    # The square slides: the strip's three frames differ (they come from across the span, not one frame thrice).
    w = (wide.shape[1] - 6) // 3
    thirds = [wide[:, k * (w + 3): k * (w + 3) + w].astype(int) for k in range(3)]
    assert np.abs(thirds[0] - thirds[2]).mean() > 5


def test_older_runs_and_catalogs_without_previews(tmp_path: Path, rows) -> None:
    """A run folder written before clips.preview_jpeg existed registers (NULL previews); a catalog file made
    before it opens read-only for the report (placeholder cards) and gains the column when opened writable."""
    vid, run = rows.video_id_for("old.mp4"), "runOld0000000000"
    folder = rows.write_run_folder(tmp_path / "old", videos=[rows.video_row(vid, run, uri="/gone/old.mp4")],
                                   clips=[rows.clip_row(vid, run)], rejects=[], runs=[rows.run_row(run, rows.T0)])
    clips = pq.read_table(folder / "clips.parquet")
    pq.write_table(clips.drop_columns(["preview_jpeg"]), folder / "clips.parquet")
    db = tmp_path / "catalog.duckdb"
    register_run(db, folder)
    con = open_catalog(db)
    assert con.execute("SELECT count(*), count(preview_jpeg) FROM clips").fetchone() == (1, 0)
    # Make it the catalog an older release wrote: no preview column anywhere, an older layout stamp.
    for view in ("kept_clips", "clip_verdicts", "clips"):
        con.execute(f"DROP VIEW {view}")
    con.execute("ALTER TABLE clips_history DROP COLUMN preview_jpeg")
    con.execute("CREATE VIEW clips AS SELECT * EXCLUDE (registered_at, is_current, standin_models) "
                "FROM clips_history WHERE is_current")
    con.execute("CREATE VIEW clip_verdicts AS SELECT clip_id, video_id, run_id, is_image, reject_reasons, "
                "[]::VARCHAR[] AS failed_thresholds, false AS standin_models, len(reject_reasons) = 0 AS kept "
                "FROM clips_history WHERE is_current")
    con.execute("CREATE VIEW kept_clips AS SELECT * FROM clips")
    con.execute("UPDATE _catalog_meta SET value = 'older' WHERE key = 'layout'")
    con.close()

    summary = write_report(db, tmp_path / "old.html")
    page = summary.path.read_text()
    assert (summary.thumbnails, summary.missing_previews) == (0, 1)
    assert page.count('class="card kept"') == 1 and "no preview: curated before previews were stored" in page

    con = open_catalog(db)  # writable: brought up to date
    assert con.execute("SELECT count(*), count(preview_jpeg) FROM clips").fetchone() == (1, 0)
    assert con.execute("SELECT count(*) FROM kept_clips").fetchone()[0] == 1
    doc = con.execute("SELECT comment FROM column_docs WHERE table_name = 'clips' AND column_name = 'preview_jpeg'")
    assert "JPEG strip" in doc.fetchone()[0]
    con.close()


def _preview_of(path: Path, info: media.MediaInfo, start: int, end: int) -> bytes:
    """What curation stores for the span: the preview from ~4 fps analysis frames at 384 px."""
    if info.is_image:
        frames = np.stack([f for _, f in media.open_frames(path, info, max_side=384)])
        return preview_jpeg(frames, np.zeros(1), 0.0)
    frames = media.read_span(path, info, start, end, max_side=384)
    pick = np.arange(0, end - start, max(1, round(info.fps / 4)))
    return preview_jpeg(frames[pick], pick / info.fps, (end - start) / info.fps)


@pytest.fixture
def media_run(tmp_path: Path, rows) -> dict:
    """A run over three generated videos (one portrait) and a JPEG with chosen scores, plus one clip from a run
    that stored no preview; the sources are deleted once the run is registered."""
    src = tmp_path / "raw"
    src.mkdir()
    _write_video(src / "magenta.mp4", frames=100, size=(192, 108), color=(255, 0, 255))
    _write_video(src / "cyan.mp4", frames=75, size=(192, 108), color=(0, 255, 255))
    _write_video(src / "portrait.mp4", frames=60, size=(108, 192), color=(255, 0, 255))
    _write_video(src / "gone.mp4", frames=60, size=(192, 108), color=(255, 255, 0))
    img = np.zeros((120, 160, 3), np.uint8)
    img[:, :80] = MAGENTA
    Image.fromarray(img).save(src / "photo.jpg", quality=95)

    run = "runM000000000000"
    videos, clips = [], []
    scores = {  # clip scores: (aesthetic, watermark, motion, reasons)
        "magenta.mp4": [((0, 50), 5.8, 0.1, 20.0, ()), ((50, 100), 4.1, 0.1, 20.0, ())],
        "cyan.mp4": [((0, 75), 6.3, 0.9, 18.0, ())],
        "portrait.mp4": [((0, 60), None, None, 0.3, ("too_static",))],
        "photo.jpg": [((0, 1), 5.1, 0.2, None, ())],
        "gone.mp4": [((0, 60), 5.5, 0.1, 15.0, ())],
    }
    for name, specs in scores.items():
        info = media.probe(src / name)
        row = {**info.to_row(), "decoder": "pyav", "cut_frames": [], "cut_detector": "adaptive(3.0)",
               "num_clips": len(specs), "run_id": run}
        row["decoder"] = "pillow" if info.is_image else "pyav"
        videos.append(row)
        for (start, end), aes, wm, motion, reasons in specs:
            clip = rows.clip_row(info.video_id, run, start=start, end=end, fps=info.fps or 25.0,
                                 width=info.display_width, height=info.display_height, is_image=info.is_image,
                                 aesthetic=aes, watermark=wm, motion=motion, reasons=reasons,
                                 caption=None if reasons else f"a coloured square slides across {name}",
                                 similarity=None if reasons else 0.31)
            if not info.is_image:
                clip["duration"] = (end - start) / info.fps
            if (name, start) == ("magenta.mp4", 0):  # a caption that stays put, as the OCR stage records it
                clip |= {"text_persistent_box": [0.55, 0.1, 0.95, 0.3], "text_area_max": 0.015}
            if name == "cyan.mp4":
                clip["overlay_box"] = [0.05, 0.05, 0.25, 0.2]
                clip |= {"text_mark": "TV5", "text_mark_confidence": 0.8, "text_mark_box": [0.7, 0.8, 0.95, 0.95]}
            if name != "gone.mp4":
                clip["preview_jpeg"] = _preview_of(src / name, info, start, end)
            clips.append(clip)
    folder = rows.write_run_folder(
        tmp_path / "out", videos=videos, clips=clips,
        rejects=[{"uri": str(src / "empty.mp4"), "video_id": None, "stage": "probe", "error_class": "EmptyFileError",
                  "message": "expected a video or image file, got 0 bytes", "run_id": run}],
        runs=[rows.run_row(run, rows.T0, counts={"inputs": 6, "videos": 5, "clips": 6, "kept": 5, "rejects": 1})],
    )
    db = tmp_path / "catalog.duckdb"
    register_run(db, folder)
    shutil.rmtree(src)
    return {"db": db, "src": src, "run": run}


def test_report_content(media_run: dict, tmp_path: Path) -> None:
    db = media_run["db"]
    before = db.read_bytes()
    summary = write_report(db, tmp_path / "report.html", ReportOptions(clips_per_sheet=10))
    assert db.read_bytes() == before  # read-only
    page = summary.path.read_text()
    # Kept: magenta 0-50 (aesthetic 5.8), the photo (5.1), gone.mp4 (5.5, no stored preview). Rejected:
    # magenta 50-100 (aesthetic 4.1), cyan (watermark 0.9), portrait (curation reason). One preview strip per card
    # but gone.mp4's, which gets a placeholder saying why.
    assert summary.missing_previews == 1
    assert summary.thumbnails == 5
    assert page.count('<img class="thumb"') == summary.thumbnails == len(_embedded_images(page))
    assert page.count('<svg class="histogram"') == len(SCORE_COLUMNS)
    assert "aesthetic_min &gt;= 4.5" in page
    assert page.count("no preview: curated before previews were stored") == 1
    assert page.count('class="card kept"') == 3 and page.count('class="card rejected"') == 3
    assert "too_static" in page and "EmptyFileError" in page
    assert "No shards yet" in page
    # The text box is outlined on each of the magenta clip's three preview frames, the overlay box on cyan's.
    # Frames are 128 * 192/108 = 228 px wide with 3 px gaps (strip 690 px): frame f's box starts at
    # (f * 231 + 0.55 * 228) / 690 of the strip.
    lefts = [float(x) for x in re.findall(r'class="box box-text"[^>]*left: ([\d.]+)%', page)]
    assert lefts == pytest.approx([100 * (f * 231 + 0.55 * 228) / 690 for f in range(3)], abs=0.2)
    assert page.count('class="box box-overlay"') == 3
    assert page.count('class="box box-mark"') == 3  # the corner text read, on the same clip's frames
    assert "text area 0.015" in page


    con = open_catalog(db)
    set_threshold(con, "aesthetic_min", 5.6)
    append_rows(con, "shards", [
        {"shard": f"17x256x448/shard-00000{i}.tar", "bucket": "17x256x448", "frames": 17, "height": 256, "width": 448,
         "fps": 8.0, "num_samples": 3, "bytes": 2_500_000, "output": "/out/shards", "selection": "true"}
        for i in range(2)])
    con.close()
    page = write_report(db, tmp_path / "report2.html").path.read_text()
    assert page.count('class="card kept"') == 1  # only magenta 0-50 scores above 5.6
    assert "aesthetic_min &gt;= 5.6" in page
    bucket_row = re.search(r"<tr><td>17x256x448</td>(.*?)</tr>", page)
    assert bucket_row is not None
    assert re.findall(r"<td>([^<]*)</td>", bucket_row.group(1)) == ["17", "256", "448", "8.0", "2", "6", "5.0"]


def test_report_command(media_run: dict, tmp_path: Path) -> None:
    out, err = io.StringIO(), io.StringIO()
    code = main(["report", str(media_run["db"]), "--output", str(tmp_path / "r.html"), "--clips", "2"], out, err)
    assert code == 0, err.getvalue()
    # Two kept cards spread over the three kept clips (lowest and highest aesthetic: the photo and magenta 0-50,
    # both readable) and two rejected ones.
    assert "4 previews" in out.getvalue() and "0 clips without a stored preview" in out.getvalue()
    page = (tmp_path / "r.html").read_text()
    assert page.count('class="card kept"') == 2 and page.count('class="card rejected"') == 2
    code = main(["report", str(tmp_path / "missing.duckdb"), "--output", str(tmp_path / "x.html")], out, err)
    assert code == 2 and "does not exist" in err.getvalue()


def test_histogram_marks_thresholds() -> None:
    svg = histogram_svg(np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]), [("aesthetic_min", ">=", 4.5)],
                        title="aesthetic_mean", bins=6, nulls=2)
    assert svg.count('class="limit"') == 1 and "aesthetic_min &gt;= 4.5" in svg
    passing = re.findall(r'<rect class="pass"', svg)
    failing = re.findall(r'<rect class="fail"', svg)
    assert len(passing) == 2 and len(failing) == 4  # 5 and 6 pass; 1-4 fail
    assert "2 without a score" in svg
    empty = histogram_svg(np.array([]), [], title="motion_mean", nulls=3)
    assert "no scores (3 NULL)" in empty


def test_report_renders_in_headless_chromium(media_run: dict, tmp_path: Path) -> None:
    exe = chromium()
    summary = write_report(media_run["db"], tmp_path / "report.html")
    url = summary.path.resolve().as_uri()
    profile = tmp_path / "chromium-profile"
    common = [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=5000"]
    dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=False)
    assert dom.returncode == 0, dom.stderr[-2000:]
    body = re.search(r"<body[^>]*>", dom.stdout)
    assert body is not None, dom.stdout[:500]
    # The page's load handler counted the pictures the browser decoded.
    loaded = int(re.search(r'data-images-loaded="(\d+)"', body.group(0)).group(1))
    broken = int(re.search(r'data-images-broken="(\d+)"', body.group(0)).group(1))
    assert (loaded, broken) == (summary.thumbnails, 0)
    assert dom.stdout.count("<svg class=\"histogram\"") == len(SCORE_COLUMNS)

    shot = tmp_path / "report.png"
    proc = subprocess.run([*common, f"--screenshot={shot}", "--window-size=1400,3000", url],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(np.int16)
    assert pixels.std() > 20, "screenshot is blank"

    def share_near(color: tuple[int, int, int], tol: int = 40) -> float:
        return float((np.abs(pixels - np.array(color)).max(axis=2) <= tol).mean())

    assert share_near((76, 175, 80)) > 1e-4, "no green histogram bars on screen"
    assert share_near((229, 115, 115), tol=20) > 1e-4, "no red histogram bars on screen"
    # Magenta is nowhere in the page's styles: only the decoded thumbnails bring it.
    assert share_near((255, 0, 255), tol=60) > 1e-4, "no thumbnails on screen"
    # The text and overlay outlines drawn over the thumbnails (orange and blue appear nowhere else).
    assert share_near((255, 152, 0), tol=30) > 1e-5, "no OCR text box outlined on screen"
    assert share_near((41, 98, 255), tol=30) > 1e-5, "no overlay box outlined on screen"


@pytest.mark.media
def test_previews_from_real_footage(shared_media: Path, tmp_path: Path, rows) -> None:
    """VP8 webm, full-range MJPEG-like mkv, H.264 mp4 and a 3:1 JPEG, curated and then deleted, all show previews."""
    raw = tmp_path / "raw"
    raw.mkdir()
    for name in ("flower.webm", "again.mkv", "friday.mp4", "leopard.jpg"):
        shutil.copy(shared_media / name, raw / name)
    out = _curate_cpu_stage(sorted(raw.iterdir()), tmp_path / "out", rows)
    db = tmp_path / "catalog.duckdb"
    register_run(db, out)
    shutil.rmtree(raw)
    summary = write_report(db, tmp_path / "report.html", ReportOptions(clips_per_sheet=12))
    page = summary.path.read_text()
    con = open_catalog(db, read_only=True)
    n_clips, n_previews = con.execute("SELECT count(*), count(preview_jpeg) FROM clips").fetchone()
    con.close()
    assert n_clips == n_previews >= 4 and summary.missing_previews == 0
    images = _embedded_images(page)
    assert len(images) == summary.thumbnails == n_clips
    assert all(p.shape[0] == PREVIEW_HEIGHT and p.std() > 10 for p in images)
    # The wide photo keeps its 3:1 shape in its one-frame preview.
    assert any(abs(p.shape[1] / p.shape[0] - 1244 / 416) < 0.05 for p in images)
