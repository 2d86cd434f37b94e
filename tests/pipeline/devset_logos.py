"""Development set for static overlays: translucent logos composited over real footage, across joined shots.

Built at test time from ``../shared/media`` through ``devset.source`` (320x180 frames, never copied into the
repository). Each dev video is a list of shots (real clips joined with hard cuts, or one shot alone), in a clean and
a marked version: the marked one carries one static mark through every shot — a channel bug (ring and letters),
a text mark, a framed name or an icon — at 20-60 % opacity, white or black, covering 1-4 % of the frame, in a
corner. Every shot is one clip.

Split, so thresholds are not judged only on what they were tuned on:

* ``tune``: again.mkv, stream-of-water.webm, flower.webm, car-detection.mp4 and the Big Buck Bunny second, from
  their first seconds, with marks drawn from seed 0;
* ``check``: adds friday.mp4 (black-and-white film), bottle-detection.mp4 and one-by-one-person-detection.mp4,
  which ``tune`` never uses, takes the other sources from later offsets, and draws its marks (kind, size,
  opacity, colour, corner) from another seed.

Single-shot videos are in both parts (persistence while the pixels under the mark change), and so are clean
static-camera videos cut into several clips (a parking lot, a bottle on a table), which must not be flagged.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from devset import SIZE, source  # noqa: F401 - source is re-exported for the overlay tests

W, H = SIZE
KINDS = ("bug", "text", "framed", "icon")
CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")


@dataclass
class LogoVideo:
    name: str
    shots: list[np.ndarray]                      # (n_i, 180, 320, 3) uint8 RGB per shot (one clip each)
    box: tuple[float, float, float, float] | None = None   # the mark's (x0, y0, x1, y1) fractions; None = clean
    mark: dict = field(default_factory=dict)     # kind, alpha, colour, area, corner


def _font(size: int) -> ImageFont.ImageFont:
    for path in ("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf",
                 "/usr/share/fonts/truetype/liberation/LiberationSans-Bold.ttf"):
        if Path(path).is_file():
            return ImageFont.truetype(path, size)
    return ImageFont.load_default(size=size)


def mark_mask(kind: str, bw: int, bh: int) -> np.ndarray:
    """(bh, bw) float32 alpha in [0, 1] of one mark drawn to fill a bw x bh box."""
    im = Image.new("L", (bw, bh), 0)
    d = ImageDraw.Draw(im)
    if kind == "bug":          # ring and two letters, a channel bug
        r = bh // 2 - 1
        d.ellipse((1, 1, 2 * r + 1, 2 * r + 1), outline=255, width=max(2, bh // 10))
        d.text((2 * r + 4, bh // 2), "TV", font=_font(int(bh * 0.75)), fill=255, anchor="lm")
    elif kind == "text":       # a name in bold letters, a fansub or copyright mark
        d.text((bw // 2, bh // 2), "NEWS24", font=_font(int(bh * 0.8)), fill=255, anchor="mm")
    elif kind == "framed":     # a framed name
        d.rectangle((0, 0, bw - 1, bh - 1), outline=255, width=2)
        d.text((bw // 2, bh // 2), "HD+", font=_font(int(bh * 0.6)), fill=255, anchor="mm")
    elif kind == "icon":       # a graphic mark: a play triangle in a rounded square
        d.rounded_rectangle((0, 0, bh - 1, bh - 1), radius=bh // 4, outline=255, width=max(2, bh // 9))
        d.polygon([(bh * 0.35, bh * 0.25), (bh * 0.35, bh * 0.75), (bh * 0.75, bh * 0.5)], fill=255)
        d.text((bh + 3, bh // 2), "PLAY", font=_font(int(bh * 0.6)), fill=255, anchor="lm")
    else:
        raise ValueError(f"mark kind: expected one of {KINDS}, got {kind!r}")
    return np.asarray(im, np.float32) / 255.0


def random_mark(rng: np.random.Generator, kind: str) -> dict:
    """A ``kind`` mark drawn from the ranges the issue names: 20-60 % opacity, 1-4 % of the frame, a corner."""
    area = rng.uniform(0.01, 0.04)
    aspect = {"bug": 2.2, "text": 3.4, "framed": 2.4, "icon": 2.6}[kind] * rng.uniform(0.85, 1.15)
    bh = int(round(np.sqrt(area * W * H / aspect)))
    bw = int(round(bh * aspect))
    return dict(kind=kind, alpha=float(rng.uniform(0.2, 0.6)), colour=(255, 255, 255) if rng.random() < 0.7 else (0, 0, 0),
                size=(bw, bh), corner=CORNERS[rng.integers(4)], margin=int(rng.integers(6, 16)))


def composite(shots: list[np.ndarray], mark: dict) -> tuple[list[np.ndarray], tuple[float, float, float, float]]:
    """Blend ``mark`` into every frame of every shot; returns the shots and the mark's box (fractions)."""
    bw, bh = mark["size"]
    m = mark["margin"]
    x0 = m if "left" in mark["corner"] else W - m - bw
    y0 = m if "top" in mark["corner"] else H - m - bh
    alpha = np.zeros((H, W), np.float32)
    alpha[y0:y0 + bh, x0:x0 + bw] = mark_mask(mark["kind"], bw, bh)
    ys, xs = np.nonzero(alpha > 0.05)
    box = (xs.min() / W, ys.min() / H, (xs.max() + 1) / W, (ys.max() + 1) / H)
    a = (mark["alpha"] * alpha)[None, ..., None]
    colour = np.asarray(mark["colour"], np.float32)
    out = [np.clip(s.astype(np.float32) * (1 - a) + colour * a, 0, 255).round().astype(np.uint8) for s in shots]
    return out, box


def _videos(media: Path, split: str) -> list[tuple[str, list[np.ndarray]]]:
    s = lambda name, start, n: source(media, name, start, n)  # noqa: E731
    if split == "tune":
        return [
            ("tune-4shots", [s("again.mkv", 0, 60), s("stream-of-water.webm", 0, 70), s("flower.webm", 0, 70),
                             s("car-detection.mp4", 0, 66)]),
            ("tune-3shots", [s("flower.webm", 40, 64), s("bbb_480p_vp9_opus_1second.webm", 0, 24),
                             s("stream-of-water.webm", 20, 70)]),
            ("tune-2shots", [s("car-detection.mp4", 120, 70), s("again.mkv", 20, 60)]),
            ("tune-5shots", [s("stream-of-water.webm", 10, 50), s("car-detection.mp4", 60, 50), s("again.mkv", 10, 50),
                             s("flower.webm", 20, 50), s("bbb_480p_vp9_opus_1second.webm", 0, 24)]),
            ("tune-1shot-handheld", [s("stream-of-water.webm", 0, 88)]),
            ("tune-1shot-timelapse", [s("flower.webm", 0, 90)]),
            ("tune-1shot-webcam", [s("again.mkv", 0, 78)]),
            # a locked-off camera cut into clips: same scene in every clip, only cars move
            ("tune-static-pieces", [s("car-detection.mp4", 0, 75), s("car-detection.mp4", 75, 75),
                                    s("car-detection.mp4", 150, 75)]),
        ]
    if split == "check":
        return [
            ("check-4shots", [s("friday.mp4", 30, 70), s("one-by-one-person-detection.mp4", 500, 60),
                              s("flower.webm", 90, 60), s("bottle-detection.mp4", 200, 66)]),
            ("check-3shots", [s("stream-of-water.webm", 45, 44), s("friday.mp4", 100, 70), s("car-detection.mp4", 250, 60)]),
            ("check-2shots", [s("bottle-detection.mp4", 400, 70), s("again.mkv", 35, 40)]),
            ("check-5shots", [s("one-by-one-person-detection.mp4", 900, 50), s("again.mkv", 5, 50), s("friday.mp4", 60, 50),
                              s("car-detection.mp4", 330, 50), s("stream-of-water.webm", 30, 50)]),
            ("check-1shot-film", [s("friday.mp4", 0, 90)]),
            ("check-1shot-handheld", [s("stream-of-water.webm", 30, 60)]),
            ("check-1shot-tripod-room", [s("one-by-one-person-detection.mp4", 1000, 90)]),
            ("check-static-pieces", [s("bottle-detection.mp4", 0, 75), s("bottle-detection.mp4", 75, 75),
                                     s("bottle-detection.mp4", 600, 75)]),
        ]
    raise ValueError(f"split: expected 'tune' or 'check', got {split!r}")


def logo_videos(media: Path, split: str) -> list[LogoVideo]:
    """Clean and marked versions of every dev video of ``split`` (marks drawn from the split's own seed)."""
    rng = np.random.default_rng({"tune": 0, "check": 1}[split] if split in ("tune", "check") else None)
    out = []
    for i, (name, shots) in enumerate(_videos(media, split)):
        out.append(LogoVideo(f"{name}/clean", shots))
        mark = random_mark(rng, KINDS[(i + (split == "check")) % len(KINDS)])  # every kind, in another order per split
        marked, box = composite(shots, mark)
        out.append(LogoVideo(f"{name}/{mark['kind']}", marked, box, mark))
    return out


def analysis_frames(shot: np.ndarray, fps: float = 30.0, analysis_fps: float = 4.0) -> np.ndarray:
    """About ``analysis_fps`` frames per second of a shot, as the CPU stage keeps them for the scorers."""
    step = max(1, int(round(fps / analysis_fps)))
    return shot[::step]


def roc_auc(pos: list[float], neg: list[float]) -> float:
    """Probability that a marked clip outscores a clean one (ties count half)."""
    p, n = np.asarray(pos)[:, None], np.asarray(neg)[None, :]
    return float(((p > n).sum() + 0.5 * (p == n).sum()) / (p.size * n.size))


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def resized(frames: np.ndarray, w: int, h: int) -> np.ndarray:
    return np.stack([cv2.resize(f, (w, h), interpolation=cv2.INTER_AREA) for f in frames])
