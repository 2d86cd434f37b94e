"""The HTML report: built from a real catalog over real encoded videos, opened in headless Chromium."""
from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from catalog.cli import main
from catalog.db import append_rows, open_catalog, register_run, set_threshold
from catalog.report import SCORE_COLUMNS, ReportOptions, histogram_svg, write_report
from pipeline import media

MAGENTA = np.array([255, 0, 255])
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]


def _write_video(path: Path, *, frames: int, size: tuple[int, int], color: tuple[int, int, int]) -> None:
    """A square of ``color`` sliding over a grey gradient, H.264 single-threaded (byte-identical run to run)."""
    w, h = size
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=Fraction(25))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.thread_count = 1
        grad = np.tile(np.linspace(40, 200, w, dtype=np.uint8)[None, :, None], (h, 1, 3))
        side = h // 2
        for i in range(frames):
            img = grad.copy()
            x = (i * 3) % (w - side)
            img[h // 4: h // 4 + side, x: x + side] = color
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


@pytest.fixture
def media_run(tmp_path: Path, rows) -> dict:
    """A run over three generated videos (one portrait), a JPEG, and one video whose file has since vanished."""
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
            clips.append(clip)
    (src / "gone.mp4").unlink()
    folder = rows.write_run_folder(
        tmp_path / "out", videos=videos, clips=clips,
        rejects=[{"uri": str(src / "empty.mp4"), "video_id": None, "stage": "probe", "error_class": "EmptyFileError",
                  "message": "expected a video or image file, got 0 bytes", "run_id": run}],
        runs=[rows.run_row(run, rows.T0, counts={"inputs": 6, "videos": 5, "clips": 6, "kept": 5, "rejects": 1})],
    )
    db = tmp_path / "catalog.duckdb"
    register_run(db, folder)
    return {"db": db, "src": src, "run": run}


def test_report_content(media_run: dict, tmp_path: Path) -> None:
    db = media_run["db"]
    before = db.read_bytes()
    summary = write_report(db, tmp_path / "report.html", ReportOptions(clips_per_sheet=10, thumbs_per_clip=3))
    assert db.read_bytes() == before  # read-only
    page = summary.path.read_text()
    # Kept: magenta 0-50 (aesthetic 5.8), the photo (5.1), gone.mp4 (5.5, source vanished since). Rejected:
    # magenta 50-100 (aesthetic 4.1), cyan (watermark 0.9), portrait (curation reason). Thumbnails: 3 per video
    # clip, 1 for the image, none for the vanished source.
    assert summary.missing_sources == 1
    assert summary.thumbnails == 3 + 1 + 3 + 3 + 3
    assert page.count('<img class="thumb"') == summary.thumbnails
    assert page.count('<svg class="histogram"') == len(SCORE_COLUMNS)
    assert "aesthetic_min &gt;= 4.5" in page
    assert "source" in page and "gone.mp4 is missing" in page
    assert page.count('class="card kept"') == 3 and page.count('class="card rejected"') == 3
    assert "too_static" in page and "EmptyFileError" in page
    assert "No shards yet" in page

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
    assert "0 clips with unreadable sources" in out.getvalue()
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


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium is not installed (tests/catalog/install_chromium.sh installs it)")
    return exe


def test_report_renders_in_headless_chromium(media_run: dict, tmp_path: Path) -> None:
    exe = _chromium()
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


@pytest.mark.media
def test_thumbnails_from_real_footage(shared_media: Path, tmp_path: Path, rows) -> None:
    """VP8 webm, full-range MJPEG-like mkv, H.264 mp4 and a 3:1 JPEG all give thumbnails at their clip spans."""
    run = "runReal000000000"
    videos, clips = [], []
    for name in ("flower.webm", "again.mkv", "friday.mp4", "leopard.jpg"):
        info = media.probe(shared_media / name)
        videos.append({**info.to_row(), "decoder": "pillow" if info.is_image else "pyav", "cut_frames": [],
                       "cut_detector": "adaptive(3.0)", "num_clips": 1, "run_id": run})
        end = 1 if info.is_image else info.frames - 5
        clip = rows.clip_row(info.video_id, run, start=0 if info.is_image else 5, end=end, fps=info.fps or 25.0,
                             width=info.display_width, height=info.display_height, is_image=info.is_image)
        clips.append(clip)
    folder = rows.write_run_folder(tmp_path / "out", videos=videos, clips=clips, rejects=[],
                                   runs=[rows.run_row(run, rows.T0)])
    db = tmp_path / "catalog.duckdb"
    register_run(db, folder)
    summary = write_report(db, tmp_path / "report.html", ReportOptions(clips_per_sheet=4, thumbs_per_clip=2))
    assert summary.missing_sources == 0
    kept = open_catalog(db, read_only=True).execute("SELECT count(*) FROM kept_clips").fetchone()[0]
    assert summary.thumbnails == 2 * 3 + 1 and kept >= 1
    # The wide photo keeps its 3:1 shape in the thumbnail.
    page = summary.path.read_text()
    uris = re.findall(r'src="data:image/jpeg;base64,([^"]+)"', page)
    sizes = [Image.open(io.BytesIO(base64.b64decode(u))).size for u in uris]
    assert any(abs(w / h - 1244 / 416) < 0.05 for w, h in sizes)
