"""Burned-in text: PP-OCRv4 text detection (the weights inside the ``rapidocr-onnxruntime`` wheel), no recognition.

What a clip gets (:class:`TextStats`): how much of the frame text covers (max and mean over the sampled frames),
how many text boxes one frame holds, and how much of that text stays in place across the clip. Text that stays
put while the clip runs is a watermark, an on-screen display (timestamp, channel name) or a fansub mark; text that
comes and goes or moves is subtitles, captions or scene text (signs the camera passes).

The detector is the published DBNet (PP-OCRv4 mobile det, ONNX) with rapidocr's own pre- and post-processing
(normalise to [-1, 1], sides rounded to multiples of 32, probability map > 0.3, boxes scoring > 0.5 kept). The one
change: the detected text kernels are grown back by an unclip ratio of 1.0 instead of rapidocr's 1.6, which leaves
recognition a margin; measured against text drawn on real footage, 1.0 gives the glyphs' box (IoU 0.68-0.99, where
1.6 gives 0.49-0.83 and areas about twice too large). Frames larger than ``MAX_SIDE`` are shrunk first.

A box persists when, in at least ``PERSIST_SHARE`` of the sampled frames, a box overlaps it (IoU >=
``PERSIST_IOU``) *and* holds the same glyphs: the fine-detail band of the luma over the pair's region correlates
(>= ``SAME_GLYPHS``). The place alone is not enough: subtitles keep to one line at the bottom, so consecutive lines
overlap in place but not in content. A camera timestamp whose last digits tick keeps most of its glyphs and
persists, as it should; a subtitle line held for the whole of a short clip persists too (without recognition, one
held line and a static caption look alike), and so does scene text on a locked-off camera.

A translucent mark is often too faint for the detector in any single frame. The clip's temporal mean frame is also
read: there a mark keeps its contrast while codec noise and moving content average out. A box found on the mean
counts as persistent text when the glyph band over it in at least ``PERSIST_SHARE`` of the frames correlates with
the mean's at ``MEAN_SAME_GLYPHS`` or more; the mean of changing subtitles at one place shows a blend of the lines,
which correlates with each line far less (0.5-0.8 for 8 to 2 alternating lines on real footage, 0.96-1.0 for the
logo dev set's marks; tuned on its tune part).

A mark over content that does not change (a locked-off camera, a dark corner of a film) leaves neither persistent
edges nor, often, a detection box: the detector needs contrast the mean frame does not have there. So the four
corners of the clip's mean frame (``CORNER`` of the width and height each) are also *read*, with PP-OCRv4's
recognition model from the same wheel (CTC over a 48 px high line, rapidocr's pre-processing), without a detection
box. A read of at least ``MARK_MIN_CHARS`` characters, a letter among them, is a corner text mark, with the mean
probability of its characters as confidence (:class:`CornerText`): channel bugs, fansub and copyright marks. Measured
on the logo dev set (tests/pipeline/devset_logos.py, the OCR stage's mean frames): the marks read at 0.62-0.99 (the
ring-and-"TV" bug over a static wall "OTV" 0.92-0.95, black "NEWS24" over a dark film corner 0.73), while such reads
on clean footage stay at or under 0.36 (the built-in sample's synthetic textures; real footage in ../shared/media
<= 0.25). Single characters reach 0.5 and digits alone 0.54 (a road marking read as "11"), which is why neither
counts. Its box: the read's first to last character step across, and down the band of the corner that reads best,
where the glyphs' fine detail is.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path

import cv2
import numpy as np

from pipeline.models import ModelLoadError, check_frames

# Longer side the detector sees at most; smaller frames are not enlarged. Enlarged, the detector reads synthetic and
# fine natural textures as text (the built-in sample's clean clips: text areas up to 0.24 at 2x), while at the
# analysis size it finds nothing there; the price is that text under ~10 px high in the analysis frame is missed.
MAX_SIDE = 640
PERSIST_IOU = 0.5          # boxes at least this overlapping in two frames are "the same place"
PERSIST_SHARE = 0.75       # ...and a box found in this share of the frames stays put
SAME_GLYPHS = 0.5          # fine-band correlation over a box pair at or above which it shows the same text
GLYPH_SIGMA = 1.0          # px: the fine band is luma minus its Gaussian blur of this sigma
MIN_PERSIST_FRAMES = 2     # fewer frames than this give no persistence evidence
MEAN_SAME_GLYPHS = 0.9     # a box found on the clip's mean frame shows text fixed in place (see above)
GRID = 512                 # text areas are measured on a mask of this longer side

# rapidocr 1.4.4's config.yaml, Det section (the values its TextDetector is built with), except the unclip ratio.
DB_THRESH, DB_BOX_THRESH, DB_UNCLIP, DB_MAX_CANDIDATES = 0.3, 0.5, 1.0, 1000
MODEL_FILE = "ch_PP-OCRv4_det_infer.onnx"
REC_MODEL_FILE = "ch_PP-OCRv4_rec_infer.onnx"
REC_HEIGHT, REC_MIN_WIDTH = 48, 320   # rapidocr's rec_img_shape [3, 48, 320]: lines are padded to at least 320 px
CORNER = (0.4, 0.25)       # each corner region read for a mark: this share of the frame's width and height
MARK_MIN_CHARS = 2         # fewer characters read, or no letter among them, is no mark (see _mark_conf)
BAND = 0.6                 # the mark's rows: the best-reading band of this share of the corner's height...
BAND_OFFSETS = 5           # ...at this many offsets top to bottom


@dataclass(frozen=True, slots=True)
class TextStats:
    area_max: float
    """Largest share of one frame covered by text boxes, in [0, 1]."""
    area_mean: float
    """Mean share of the frame covered by text boxes over the sampled frames."""
    boxes: int
    """Most text boxes found in one frame."""
    persistent_area: float
    """Share of the frame covered by text that stays in place across the clip (watermark, OSD, channel name)."""
    persistent_box: tuple[float, float, float, float] | None
    """(x0, y0, x1, y1) fractions: the bounding box of the persistent text; None when no text persists."""
    frames: int
    """Frames the detector saw."""
    mark_text: str = ""
    """Text read in a corner of the clip's mean frame (at least ``MARK_MIN_CHARS`` characters), else ''."""
    mark_confidence: float = 0.0
    """Mean character probability of ``mark_text``, in [0, 1]; 0 when nothing was read."""
    mark_box: tuple[float, float, float, float] | None = None
    """(x0, y0, x1, y1) fractions: where ``mark_text`` was read; None when nothing was."""


NO_TEXT = TextStats(area_max=0.0, area_mean=0.0, boxes=0, persistent_area=0.0, persistent_box=None, frames=0)


@dataclass(frozen=True, slots=True)
class CornerText:
    text: str
    confidence: float
    box: tuple[float, float, float, float] | None


NO_MARK = CornerText("", 0.0, None)


def default_model_path(name: str = MODEL_FILE) -> Path:
    """A PP-OCRv4 model shipped inside the installed rapidocr-onnxruntime wheel (detection by default)."""
    try:
        import rapidocr_onnxruntime
    except ImportError as err:
        raise ModelLoadError(f"the OCR stage needs rapidocr-onnxruntime (pip install rapidocr-onnxruntime): "
                             f"{err}") from err
    path = Path(rapidocr_onnxruntime.__file__).parent / "models" / name
    if not path.is_file():
        raise ModelLoadError(f"expected the PP-OCRv4 model {name} at {path}; the rapidocr-onnxruntime install "
                             "lacks it")
    return path


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n, m) IoU of (n, 4) and (m, 4) [x0, y0, x1, y1] boxes."""
    ix = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    iy = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = ix * iy
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-12)


def _coverage(boxes: np.ndarray, aspect: float) -> float:
    """Share of a frame of width/height ``aspect`` covered by the union of (n, 4) fraction boxes."""
    if len(boxes) == 0:
        return 0.0
    gw, gh = (GRID, max(1, round(GRID / aspect))) if aspect >= 1 else (max(1, round(GRID * aspect)), GRID)
    mask = np.zeros((gh, gw), bool)
    for x0, y0, x1, y1 in boxes:
        mask[round(y0 * gh):round(y1 * gh), round(x0 * gw):round(x1 * gw)] = True
    return float(mask.mean())


def _fine_band(frames: np.ndarray) -> np.ndarray:
    """(K, H, W) float32 fine-detail band of the luma of (K, H, W, 3) uint8 RGB frames: where glyph edges live."""
    out = []
    for f in frames:
        g = cv2.cvtColor(f, cv2.COLOR_RGB2GRAY).astype(np.float32)
        out.append(g - cv2.GaussianBlur(g, (0, 0), GLYPH_SIGMA))
    return np.stack(out)


def _glyph_corr(fine: np.ndarray, t: int, u: int, a: np.ndarray, b: np.ndarray) -> float:
    """Normalised correlation of frames t and u's fine band over the union of fraction boxes a and b (0 if flat)."""
    h, w = fine.shape[1:]
    x0, y0 = int(np.floor(min(a[0], b[0]) * w)), int(np.floor(min(a[1], b[1]) * h))
    x1, y1 = int(np.ceil(max(a[2], b[2]) * w)), int(np.ceil(max(a[3], b[3]) * h))
    p, q = fine[t, y0:y1, x0:x1], fine[u, y0:y1, x0:x1]
    den = float(np.sqrt((p * p).sum() * (q * q).sum()))
    return float((p * q).sum()) / den if den > 0 else 0.0


def _same_glyphs(fine: np.ndarray, t: int, u: int, a: np.ndarray, b: np.ndarray) -> bool:
    """Frames t and u show the same text over the union of fraction boxes a and b (normalised correlation)."""
    return _glyph_corr(fine, t, u, a, b) >= SAME_GLYPHS


def text_stats(boxes: list[np.ndarray], aspect: float, frames: np.ndarray | None = None,
               mean_boxes: np.ndarray | None = None, mean_frame: np.ndarray | None = None) -> TextStats:
    """Clip statistics from per-frame (n_t, 4) [x0, y0, x1, y1] text boxes in fractions of a ``aspect`` (w/h) frame.

    ``frames`` (K, H, W, 3) uint8, the frames the boxes came from, lets persistence also require the same glyphs;
    without them a box in the same place counts as the same text. ``mean_boxes`` (n, 4), found on ``mean_frame``
    (H, W, 3), the clip's temporal mean, add persistent text where the glyphs of ``frames`` match the mean's there.
    """
    k = len(boxes)
    if k == 0:
        return NO_TEXT
    boxes = [np.asarray(b, np.float64).reshape(-1, 4) for b in boxes]
    areas = [_coverage(b, aspect) for b in boxes]
    fine = None if frames is None else _fine_band(frames)
    persistent: list[np.ndarray] = []
    if k >= MIN_PERSIST_FRAMES:
        need = max(MIN_PERSIST_FRAMES, int(np.ceil(PERSIST_SHARE * k)))
        for t, b in enumerate(boxes):
            for box in b:
                # Frames (this one included) holding a box in the same place, showing the same text.
                seen = 0
                for u, o in enumerate(boxes):
                    same = o[_iou(box[None], o)[0] >= PERSIST_IOU] if len(o) else o
                    if u == t or fine is None:
                        seen += len(same) > 0
                    else:
                        seen += any(_same_glyphs(fine, t, u, box, m) for m in same)
                if seen >= need:
                    persistent.append(box)
    if mean_boxes is not None and len(mean_boxes) and frames is not None and mean_frame is not None and \
            k >= MIN_PERSIST_FRAMES:
        need = max(MIN_PERSIST_FRAMES, int(np.ceil(PERSIST_SHARE * k)))
        fine_all = np.concatenate([fine, _fine_band(np.asarray(mean_frame, np.uint8)[None])])  # mean last
        for box in np.asarray(mean_boxes, np.float64).reshape(-1, 4):
            if sum(_glyph_corr(fine_all, t, k, box, box) >= MEAN_SAME_GLYPHS for t in range(k)) >= need:
                persistent.append(box)
    if persistent:
        p = np.stack(persistent)
        p_area = _coverage(p, aspect)
        p_box = (float(p[:, 0].min()), float(p[:, 1].min()), float(p[:, 2].max()), float(p[:, 3].max()))
    else:
        p_area, p_box = 0.0, None
    return TextStats(area_max=float(max(areas)), area_mean=float(np.mean(areas)), boxes=int(max(len(b) for b in boxes)),
                     persistent_area=p_area, persistent_box=p_box, frames=k)


class TextReader:
    """PP-OCRv4 text recognition (CTC) on onnxruntime: reads one line of text from an image, no detection box.

    Pre-processing as rapidocr's: BGR, 48 px high, scaled to [-1, 1], right-padded with zeros to at least 320 px.
    The character list is the one stored in the model's metadata, with CTC's blank first and a space last.
    """

    def __init__(self, model_path: str | Path | None = None, *, session_options=None,
                 providers: list[str] | None = None) -> None:
        import onnxruntime as ort

        path = Path(model_path) if model_path else default_model_path(REC_MODEL_FILE)
        if not path.is_file():
            raise ModelLoadError(f"expected a text recognition ONNX model at {path}, found no file")
        self.session = ort.InferenceSession(str(path), sess_options=session_options,
                                            providers=providers or ["CPUExecutionProvider"])
        meta = self.session.get_modelmeta().custom_metadata_map
        if "character" not in meta:
            raise ModelLoadError(f"expected the recognition model's character list in its metadata ('character'), "
                                 f"got keys {sorted(meta)}: {path}")
        self.chars = ["", *meta["character"].splitlines(), " "]
        self.input_name = self.session.get_inputs()[0].name
        self.name = path.name

    def read(self, crops: list[np.ndarray]) -> list[tuple[str, float, np.ndarray, float]]:
        """Per (h, w, 3) uint8 RGB crop: ``(text, confidence, steps, px_per_step)``: the text, the mean probability
        of its characters (0 for none), the CTC steps that emitted them and the crop pixels one step spans."""
        sized = []
        for crop in crops:
            h, w = crop.shape[:2]
            rw = max(1, math.ceil(REC_HEIGHT * w / h))
            x = cv2.resize(np.ascontiguousarray(crop[:, :, ::-1]), (rw, REC_HEIGHT)).astype(np.float32)
            sized.append((x.transpose(2, 0, 1) / 255.0 - 0.5) / 0.5)       # (3, 48, rw) in [-1, 1]
        width = max(REC_MIN_WIDTH, *(x.shape[2] for x in sized))
        batch = np.zeros((len(sized), 3, REC_HEIGHT, width), np.float32)
        for i, x in enumerate(sized):
            batch[i, :, :, :x.shape[2]] = x
        probs = self.session.run(None, {self.input_name: batch})[0]          # (N, T, classes) softmax
        out = []
        for crop, x, p in zip(crops, sized, probs):
            idx, prob = p.argmax(axis=1), p.max(axis=1)
            emit = idx != 0
            emit[1:] &= idx[1:] != idx[:-1]                                  # CTC: drop blanks and repeats
            steps = np.flatnonzero(emit)
            text = "".join(self.chars[i] for i in idx[steps])
            conf = float(prob[steps].mean()) if len(steps) else 0.0
            out.append((text, conf, steps, width / p.shape[0] * crop.shape[1] / x.shape[2]))
        return out

    def corner_mark(self, frame: np.ndarray) -> CornerText:
        """The best read of at least ``MARK_MIN_CHARS`` characters, a letter among them, among the four ``CORNER``
        regions of an (H, W, 3) uint8 RGB frame (the clip's mean), with its box; ``NO_MARK`` when no corner reads
        as a mark."""
        h, w = frame.shape[:2]
        cw, ch = min(w, max(8, round(w * CORNER[0]))), min(h, max(8, round(h * CORNER[1])))
        origins = [(0, 0), (w - cw, 0), (0, h - ch), (w - cw, h - ch)]
        reads = self.read([frame[y:y + ch, x:x + cw] for x, y in origins])
        best = max(range(4), key=lambda i: _mark_conf(reads[i]))
        if _mark_conf(reads[best]) == 0.0:
            return NO_MARK
        text, conf = reads[best][0].strip(), reads[best][1]
        return CornerText(text, conf, self._locate(frame, *origins[best], cw, ch, reads[best]))

    def _locate(self, frame: np.ndarray, x0: int, y0: int, cw: int, ch: int,
                whole: tuple[str, float, np.ndarray, float]) -> tuple[float, float, float, float]:
        """Box of the text read in the corner at (x0, y0): across, its first to last character step (half a
        character wider each side: CTC emits near a glyph's middle); down, the glyphs' rows in the band of the
        corner that reads best (``whole``, the corner's own read, when no band alone reads as a mark)."""
        h, w = frame.shape[:2]
        corner = frame[y0:y0 + ch, x0:x0 + cw]
        bh = max(4, round(BAND * ch))
        offsets = sorted({int(o) for o in np.linspace(0, ch - bh, BAND_OFFSETS).round()})
        reads = self.read([corner[o:o + bh] for o in offsets])
        k = max(range(len(offsets)), key=lambda i: _mark_conf(reads[i]))
        if _mark_conf(reads[k]) == 0.0:  # no band alone reads it: the whole corner, read across
            k, reads, offsets, bh = 0, [whole], [0], ch
        _, _, steps, step_px = reads[k]
        char = (steps[-1] - steps[0]) / (len(steps) - 1) * step_px if len(steps) > 1 else 2 * step_px
        xa, xb = max(0.0, steps[0] * step_px - char / 2), min(float(cw), (steps[-1] + 1) * step_px + char / 2)
        band = cv2.cvtColor(corner[offsets[k]:offsets[k] + bh], cv2.COLOR_RGB2GRAY).astype(np.float32)
        detail = np.abs(band - cv2.GaussianBlur(band, (0, 0), 1.5))[:, int(xa):max(int(xa) + 1, math.ceil(xb))]
        profile = detail.mean(axis=1)
        rows = np.flatnonzero(profile > profile.min() + 0.3 * (profile.max() - profile.min()))
        ya, yb = (offsets[k] + rows[0], offsets[k] + rows[-1] + 1) if len(rows) else (offsets[k], offsets[k] + bh)
        return (float(x0 + xa) / w, float(y0 + ya) / h, float(x0 + xb) / w, float(y0 + yb) / h)


def _mark_conf(read: tuple[str, float, np.ndarray, float]) -> float:
    """A read's confidence if it holds at least ``MARK_MIN_CHARS`` characters, a letter among them, else 0.

    Digits alone are what straight lines read as (a road marking on a static camera: "11" at 0.54); a mark of
    digits only (a timestamp OSD) ticks, and is persistent text instead."""
    text = read[0].replace(" ", "")
    return read[1] if len(text) >= MARK_MIN_CHARS and any(c.isalpha() for c in text) else 0.0


class TextDetector:
    """PP-OCRv4 text detection on onnxruntime; ``boxes`` gives each frame's text boxes as frame fractions."""

    def __init__(self, model_path: str | Path | None = None, *, device: str = "cpu", threads: int | None = None,
                 max_side: int = MAX_SIDE, rec_model_path: str | Path | None = None) -> None:
        import onnxruntime as ort
        from rapidocr_onnxruntime.ch_ppocr_det.utils import DBPostProcess

        path = Path(model_path) if model_path else default_model_path()
        if not path.is_file():
            raise ModelLoadError(f"expected a text detection ONNX model at {path}, found no file")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        threads = threads or max(1, int(os.environ.get("VIDCURATE_ACTOR_THREADS", "1")))
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda"):
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                # The CPU onnxruntime wheel has no CUDA provider; the text detector is small enough to run on CPU.
                print(f"OCR: device {device!r} asked for, but onnxruntime offers only {ort.get_available_providers()} "
                      "(install onnxruntime-gpu for CUDA); detecting text on the CPU")
            else:
                providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        self.input_name = self.session.get_inputs()[0].name
        self.reader = TextReader(rec_model_path, session_options=opts, providers=providers)
        self.post = DBPostProcess(thresh=DB_THRESH, box_thresh=DB_BOX_THRESH, max_candidates=DB_MAX_CANDIDATES,
                                  unclip_ratio=DB_UNCLIP, use_dilation=True, score_mode="fast")
        self.max_side = max_side
        self.provider = self.session.get_providers()[0]
        try:
            version = metadata.version("rapidocr-onnxruntime")
        except metadata.PackageNotFoundError:
            version = "?"
        self.model_id = (f"PP-OCRv4-det:{path.name}+rec:{self.reader.name} (rapidocr-onnxruntime {version}, "
                         f"{self.provider})")

    def _input(self, frames: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) uint8 RGB -> (N, 3, h, w) float32 in [-1, 1], BGR as PaddleOCR reads images, sides % 32 == 0."""
        n, h, w = frames.shape[:3]
        s = min(1.0, self.max_side / max(h, w))
        rh, rw = max(32, int(round(h * s / 32)) * 32), max(32, int(round(w * s / 32)) * 32)
        x = np.stack([cv2.resize(f[:, :, ::-1], (rw, rh), interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
                      for f in frames])                                   # (N, rh, rw, 3) uint8 BGR
        return (x.astype(np.float32).transpose(0, 3, 1, 2) / 127.5 - 1.0).astype(np.float32)

    def boxes(self, frames: np.ndarray) -> list[np.ndarray]:
        """Per frame of (N, H, W, 3) uint8 RGB: (n, 4) text boxes [x0, y0, x1, y1] as fractions of width/height."""
        frames = check_frames(frames, what="TextDetector.boxes frames")
        n, h, w = frames.shape[:3]
        prob = self.session.run(None, {self.input_name: self._input(frames)})[0]  # (N, 1, h', w') text probability
        out = []
        for i in range(n):
            quads, _ = self.post(prob[i:i + 1], (h, w))                   # (n, 4, 2) px corners in the input frame
            quads = np.asarray(quads, np.float64).reshape(-1, 4, 2)
            b = np.zeros((0, 4))
            if len(quads):
                b = np.stack([quads[:, :, 0].min(1) / w, quads[:, :, 1].min(1) / h,
                              quads[:, :, 0].max(1) / w, quads[:, :, 1].max(1) / h], axis=1)
            # rapidocr drops boxes 3 px or thinner in the original frame; so do we.
            keep = ((b[:, 2] - b[:, 0]) * w > 3) & ((b[:, 3] - b[:, 1]) * h > 3)
            out.append(np.clip(b[keep], 0.0, 1.0))
        return out

    def text_regions(self, frames: np.ndarray, mean_of: np.ndarray | None = None) -> TextStats:
        """:class:`TextStats` of (N, H, W, 3) uint8 RGB frames sampled across one clip (~1 fps).

        The clip's mean frame (see the module doc) is taken over ``mean_of`` (more frames of the same clip, same
        size: a mean of more frames averages moving content out better), else over ``frames``; one more detector
        frame per clip, and the four corners of the mean frame read for a text mark (:meth:`TextReader.corner_mark`)."""
        frames = check_frames(frames, what="text_regions frames")
        source = frames if mean_of is None else check_frames(mean_of, what="text_regions mean_of frames")
        if source.shape[1:] != frames.shape[1:]:
            raise ValueError(f"text_regions: mean_of frames must match the frames' size {frames.shape[1:]}, "
                             f"got {source.shape[1:]}")
        boxes = self.boxes(frames)
        mean_frame = mean_boxes = None
        mark = NO_MARK
        if len(frames) >= MIN_PERSIST_FRAMES:
            mean_frame = np.round(source.mean(axis=0, dtype=np.float32)).astype(np.uint8)
            mean_boxes = self.boxes(mean_frame[None])[0]
            mark = self.reader.corner_mark(mean_frame)
        stats = text_stats(boxes, frames.shape[2] / frames.shape[1], frames, mean_boxes, mean_frame)
        return replace(stats, mark_text=mark.text, mark_confidence=mark.confidence, mark_box=mark.box)


_DEFAULT: TextDetector | None = None


def text_regions(frames: np.ndarray, detector: TextDetector | None = None) -> TextStats:
    """:class:`TextStats` of a clip's frames with ``detector`` (default: the bundled PP-OCRv4 model on CPU, loaded
    once)."""
    global _DEFAULT
    if detector is None:
        if _DEFAULT is None:
            _DEFAULT = TextDetector()
        detector = _DEFAULT
    return detector.text_regions(frames)
