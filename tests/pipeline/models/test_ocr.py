"""OCR stage: the real PP-OCRv4 detection weights bundled in rapidocr-onnxruntime find text drawn on real footage,
box it, tell text that stays in place (timestamp, channel name) from text that changes (subtitles), and find
nothing on clean footage."""
from __future__ import annotations

import json
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from pipeline.models.ocr import NO_TEXT, TextDetector, text_stats
from pipeline.settings import PrefilterConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/pipeline: devset.py, the real-footage builder
import devset  # noqa: E402

pytest.importorskip("rapidocr_onnxruntime")


@pytest.fixture(scope="module")
def detector() -> TextDetector:
    return TextDetector(threads=1)


@lru_cache(maxsize=8)
def font(size: int) -> ImageFont.ImageFont:
    for path in ("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf",
                 "/usr/share/fonts/truetype/liberation/LiberationSans-Bold.ttf"):
        if Path(path).is_file():
            return ImageFont.truetype(path, size)
    return ImageFont.load_default(size=size)  # Pillow's bundled FreeType font


def draw(frames: np.ndarray, texts: list[str], xy: tuple[int, int], size: int,
         fill=(255, 255, 255)) -> tuple[np.ndarray, list[tuple[float, float, float, float]]]:
    """Draw ``texts[i]`` on frame i at ``xy`` (a dark outline, as subtitles have); returns frames and the text boxes
    as fractions of the frame."""
    out, boxes = [], []
    h, w = frames.shape[1:3]
    for f, text in zip(frames, texts):
        im = Image.fromarray(f)
        d = ImageDraw.Draw(im)
        d.text(xy, text, font=font(size), fill=fill, stroke_width=1, stroke_fill=(0, 0, 0))
        x0, y0, x1, y1 = d.textbbox(xy, text, font=font(size), stroke_width=1)
        out.append(np.asarray(im))
        boxes.append((x0 / w, y0 / h, x1 / w, y1 / h))
    return np.stack(out), boxes


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def one_fps(media: Path, name: str, start: int = 0, n: int = 8) -> np.ndarray:
    """~1 fps frames of a real clip at the dev-set size (320x180), as the OCR stage receives them."""
    return devset.source(media, name, start, 30 * n)[::30]


SUBTITLES = ["Where are you going?", "I don't know yet.", "Maybe home, maybe not.", "Then I'll come with you.",
             "It's a long way.", "We have time.", "Do we?", "We always did."]


@pytest.mark.media
def test_changing_subtitles_on_real_footage_are_found_boxed_and_not_persistent(media_dir, detector) -> None:
    clean = one_fps(media_dir, "car-detection.mp4")
    frames, truth = draw(clean, SUBTITLES, (40, 150), 14, fill=(255, 255, 0))
    per_frame = detector.boxes(frames)
    for t, (found, want) in enumerate(zip(per_frame, truth)):
        assert len(found) >= 1 and max(iou(b, want) for b in found) >= 0.5, (t, found, want)
    st = detector.text_regions(frames)
    assert st.area_max > PrefilterConfig().text_area_max, st
    assert st.boxes >= 1 and st.frames == len(frames)
    # Consecutive lines share the bottom line's place but not its glyphs: nothing persists.
    assert st.persistent_area == 0.0 and st.persistent_box is None, st


@pytest.mark.media
def test_timestamp_osd_persists_in_place_and_is_boxed(media_dir, detector) -> None:
    clean = one_fps(media_dir, "stream-of-water.webm", n=3)
    clean = np.concatenate([clean, one_fps(media_dir, "flower.webm", n=5)])   # a cut halfway: the OSD stays
    stamps = [f"CAM 2  2026-12-01  14:03:{s:02d}" for s in range(17, 25)]     # the seconds tick
    frames, truth = draw(clean, stamps, (8, 6), 11)
    st = detector.text_regions(frames)
    assert st.persistent_area > PrefilterConfig().text_persistent_max, st
    assert st.persistent_box is not None and iou(st.persistent_box, truth[0]) >= 0.5, (st, truth[0])


def translucent_mark(frames: np.ndarray, text: str, corner: str, size: int, alpha: float,
                     colour=(255, 255, 255)) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """``text`` drawn ``alpha`` opaque in ``corner`` ('top-left', ... 8 px in) of every frame, as a channel bug or
    fansub mark is; returns the frames and the glyphs' box as fractions of the frame."""
    h, w = frames.shape[1:3]
    mask = Image.new("L", (w, h), 0)
    d = ImageDraw.Draw(mask)
    x0, y0, x1, y1 = d.textbbox((0, 0), text, font=font(size))
    x = 8 - x0 if corner.endswith("left") else w - 8 - x1
    y = 8 - y0 if corner.startswith("top") else h - 8 - y1
    d.text((x, y), text, font=font(size), fill=255)
    a = np.asarray(mask, np.float32)[None, :, :, None] / 255.0 * alpha
    out = np.round(frames * (1 - a) + np.asarray(colour, np.float32) * a).astype(np.uint8)
    return out, ((x + x0) / w, (y + y0) / h, (x + x1) / w, (y + y1) / h)


@pytest.mark.media
@pytest.mark.parametrize(("name", "text", "corner", "alpha", "colour"), [
    ("bottle-detection.mp4", "TV5 HD", "top-right", 0.4, (255, 255, 255)),   # a locked-off camera: nothing moves
    ("friday.mp4", "ANIME-SUB", "bottom-left", 0.45, (255, 255, 255)),        # a film, its corner dark
    ("car-detection.mp4", "(c) 2026", "bottom-right", 0.35, (0, 0, 0)),      # a black copyright line
])
def test_text_mark_over_content_that_does_not_change_is_read_in_its_corner(media_dir, detector, name, text, corner,
                                                                           alpha, colour) -> None:
    """The blind spot of persistence: a mark over a static background gives the static-overlay scorer nothing, and
    the detector often no box, but the recognition model reads it in the clip's mean frame, and boxes it."""
    from pipeline.scoring.overlay import static_overlay

    clean = one_fps(media_dir, name, n=6)
    frames, truth = translucent_mark(clean, text, corner, 14, alpha, colour)
    pre = PrefilterConfig()
    overlay = static_overlay(frames).score
    assert overlay <= pre.overlay_max  # the case persistence cannot decide (measured 0.09, 0.27, 0.23)
    st = detector.text_regions(frames)
    assert st.mark_confidence > pre.text_mark_max, st
    assert iou(st.mark_box, truth) >= 0.4, (st.mark_box, truth)
    assert detector.text_regions(clean).mark_confidence <= pre.text_mark_max
    print(f"{name}: overlay {overlay:.2f}, read {st.mark_text!r} {st.mark_confidence:.2f}, "
          f"box IoU {iou(st.mark_box, truth):.2f}")


@pytest.mark.media
@pytest.mark.parametrize("name", ["car-detection.mp4", "flower.webm", "stream-of-water.webm",
                                  "bbb_480p_vp9_opus_1second.webm", "friday.mp4"])
def test_clean_real_footage_has_about_no_text(media_dir, detector, name: str) -> None:
    n = 1 if name.startswith("bbb") else 5  # the Big Buck Bunny file lasts one second
    frames = devset.source(media_dir, name, 0, 30 * n)[::6]
    st = detector.text_regions(frames)
    assert st.area_max < 0.005 and st.persistent_area == 0.0, st
    assert st.mark_confidence <= PrefilterConfig().text_mark_max, st


def test_built_in_sample_has_no_text(sample_dir, sample_truth, detector) -> None:
    """No clip of the built-in sample is taken for text, synthetic textures included, so the sample run drops nothing
    for text; only logo.mp4's static mark is. Its framed 'LOGO' (9 px high at the analysis size) is under the
    detector's reach in every single frame, but the clip's mean frame shows it: persistent text inside the mark's box
    (the static overlay scorer drops that clip before the OCR stage in a run)."""
    from pipeline import media

    for item in sample_truth.items:
        info = media.probe(sample_dir / item.file)
        frames = np.stack([f for _, f in media.open_frames(sample_dir / item.file, info, max_side=384)])
        st = detector.text_regions(frames[::max(1, round(info.fps or 1))])   # ~1 fps
        assert st.area_max == 0.0, (item.file, st)
        if item.logo_box is None:
            assert st.persistent_box is None, (item.file, st)
            assert st.mark_confidence <= PrefilterConfig().text_mark_max, (item.file, st)
        elif st.persistent_box is not None:
            (x0, y0, x1, y1), (lx0, ly0, lx1, ly1) = st.persistent_box, item.logo_box
            assert lx0 <= x0 < x1 <= lx1 and ly0 <= y0 < y1 <= ly1, (item.file, st, item.logo_box)


@pytest.mark.slow
def test_ocr_stage_runs_in_the_sample_curation(sample_curation) -> None:
    """The default stages run OCR with the real weights in the built-in sample run: every clip that reached the
    model stages has its text columns and the detector's id."""
    from catalog.db import open_catalog

    con = open_catalog(sample_curation / "catalog.duckdb", read_only=True)
    rows = con.execute("SELECT clip_id, text_area_max, text_persistent_area, models['ocr'], reject_reasons "
                       "FROM clips WHERE models['watermark'] IS NOT NULL").fetchall()
    kept = con.execute("SELECT count(*) FROM kept_clips").fetchone()[0]
    con.close()
    assert rows, "no clip reached the model stages"
    for clip_id, area, persistent, model, reasons in rows:
        assert area == 0.0 and persistent == 0.0, (clip_id, area, persistent)
        assert model.startswith("PP-OCRv4-det"), model
        assert not {"text", "persistent_text", "text_mark"} & set(reasons), reasons
    assert kept > 0


def test_persistence_needs_the_same_place_in_most_frames() -> None:
    corner = np.array([[0.02, 0.02, 0.2, 0.08]])
    lines = [np.array([[0.1 + 0.3 * (t % 3), 0.85, 0.4 + 0.3 * (t % 3), 0.92]]) for t in range(8)]
    held = text_stats([corner] * 8, 16 / 9)
    assert held.persistent_box == pytest.approx(tuple(corner[0]))
    assert held.persistent_area == pytest.approx(held.area_max, rel=0.05)
    assert held.area_max == pytest.approx(0.18 * 0.06, rel=0.15)
    assert text_stats(lines, 16 / 9).persistent_area == 0.0          # the place keeps moving
    flicker = [corner if t < 3 else np.zeros((0, 4)) for t in range(8)]
    assert text_stats(flicker, 16 / 9).persistent_area == 0.0         # there for 3 of 8 frames only
    assert text_stats([corner], 16 / 9).persistent_area == 0.0        # one frame says nothing about persistence
    assert text_stats([], 16 / 9) == NO_TEXT


@pytest.mark.media
def test_ocr_stage_records_columns_and_reasons(media_dir) -> None:
    """The Ray stage class as Ray Data calls it (one batch, no cluster): columns, model id, reject reasons."""
    from pipeline.stages import ModelSources, OCRStage, pack_frames

    clean = one_fps(media_dir, "flower.webm", n=4)
    subtitled, _ = draw(clean, SUBTITLES, (40, 150), 14)
    batch = {"kind": np.array(["clip", "clip", "video"], object), "frames": np.array([], object)}
    recs = [{"clip_id": "a", "reject_reasons": []}, {"clip_id": "b", "reject_reasons": []}, {"video_id": "v"}]
    batch["record"] = np.array([json.dumps(r) for r in recs], object)
    times = np.arange(4, dtype=np.float32)
    batch["frames"] = np.array([pack_frames(clean, times), pack_frames(subtitled, times), b""], object)
    stage = OCRStage(ModelSources(watermark="", clip_model="", clip_pretrained="", aesthetic_mlp="", caption=None,
                                  device="cpu", prefilter=PrefilterConfig()))
    out = [json.loads(r) for r in stage(batch)["record"]]
    assert out[0]["reject_reasons"] == [] and out[0]["text_area_max"] < 0.005, out[0]
    assert out[0]["text_mark_confidence"] <= PrefilterConfig().text_mark_max and "text_mark_box" in out[0], out[0]
    assert "text" in out[1]["reject_reasons"] and out[1]["text_boxes"] >= 1, out[1]
    assert out[0]["models"]["ocr"].startswith("PP-OCRv4-det") and out[0]["stage_versions"]["ocr"]
    assert "text_area_max" not in out[2]


def test_text_found_on_the_mean_frame_persists_only_where_the_frames_show_the_same_glyphs() -> None:
    """A box from the clip's mean frame is persistent text when the frames' glyph band there matches the mean's (a
    faint fixed mark), not when it is a blend of different lines in one place (changing subtitles)."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (4, 90, 160, 3), dtype=np.uint8)
    box = np.array([[0.25, 0.2, 0.75, 0.5]])
    fixed, changing = base.copy(), base.copy()
    glyphs = rng.integers(0, 256, (27, 80, 3), dtype=np.uint8)
    for t in range(4):
        fixed[t, 18:45, 40:120] = glyphs
        changing[t, 18:45, 40:120] = rng.integers(0, 256, (27, 80, 3), dtype=np.uint8)
    no_boxes = [np.zeros((0, 4))] * 4
    for frames, persists in ((fixed, True), (changing, False)):
        mean = np.round(frames.mean(axis=0)).astype(np.uint8)
        st = text_stats(no_boxes, 160 / 90, frames, box, mean)
        assert (st.persistent_box is not None) == persists, (persists, st)
        assert st.area_max == 0.0
    assert text_stats(no_boxes, 160 / 90, fixed).persistent_box is None  # no mean frame, no mean evidence


def test_a_corner_read_is_a_mark_only_with_two_characters_and_a_letter() -> None:
    """What straight lines and texture read as does not count: single characters (clean footage reaches 0.5) and
    digits alone (a road marking on a static camera read as "11" at 0.54)."""
    from pipeline.models.ocr import _mark_conf

    steps = np.array([3, 7, 11])
    assert _mark_conf(("11", 0.9, steps, 4.0)) == 0.0
    assert _mark_conf(("T ", 0.9, steps, 4.0)) == 0.0
    assert _mark_conf(("TV", 0.7, steps, 4.0)) == 0.7
    assert _mark_conf(("(c) 2026", 0.6, steps, 4.0)) == 0.6
