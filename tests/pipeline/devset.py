"""The development set for scene cuts, fades, grayscale, blur and stillness, built from real footage.

Everything is built at test time from ``../shared/media`` (never copied into the repository): real single-shot
clips resized to one size and joined with hard cuts or with fades through black, grayscale copies, defocused and
motion-blurred copies, a frozen copy and the calm tripod / webcam shots as they are.

The set is split in two so thresholds are not only judged on what they were tuned on:

* ``TUNE``: built from again.mkv, stream-of-water.webm, flower.webm, car-detection.mp4 and the Big Buck Bunny
  second, from their first seconds;
* ``CHECK``: adds friday.mp4 (a real black-and-white film), bottle-detection.mp4 and
  one-by-one-person-detection.mp4, which the tune part never uses, and takes the other sources from later offsets,
  in other orders, with other part and fade lengths.

Frame numbers in the truth are 0-based; a cut at ``c`` means a new shot starts at ``c``. The Big Buck Bunny second opens with a fade-in from black, so joins take it from frame 14. A fade through black
counts as one boundary, placed at the middle of its black frames (``black_start + black_len // 2``), where the
detector places it too (see ``pipeline.scenecut``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import av
import cv2
import numpy as np

SIZE = (320, 180)   # (w, h) of every dev-set frame
FPS = 30.0

TUNE_SOURCES = ("again.mkv", "stream-of-water.webm", "flower.webm", "car-detection.mp4",
                "bbb_480p_vp9_opus_1second.webm")
CHECK_ONLY_SOURCES = ("friday.mp4", "bottle-detection.mp4", "one-by-one-person-detection.mp4")


@lru_cache(maxsize=64)
def _decoded(path: str, start: int, n: int) -> np.ndarray:
    out = []
    with av.open(path) as c:
        for i, f in enumerate(c.decode(video=0)):
            if i < start:
                continue
            rgb = f.to_ndarray(format="rgb24")
            out.append(cv2.resize(rgb, SIZE, interpolation=cv2.INTER_AREA))
            if len(out) == n:
                break
    if not out:
        raise ValueError(f"{path}: no frames from frame {start}")
    frames = np.stack(out)
    frames.setflags(write=False)
    return frames


def source(media: Path, name: str, start: int, n: int) -> np.ndarray:
    """(n, 180, 320, 3) RGB frames ``start..start+n`` of a real clip; a short source is looped back and forth."""
    frames = _decoded(str(media / name), start, n)
    while len(frames) < n:  # ping-pong: the loop point is no cut (the next frame is the same picture)
        frames = np.concatenate([frames, frames[::-1][1:]])
    return frames[:n]


def gray(frames: np.ndarray) -> np.ndarray:
    """Black-and-white copy (luma replicated into R, G, B)."""
    y = np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames])
    return np.repeat(y[..., None], 3, axis=3)


def defocus(frames: np.ndarray, sigma: float) -> np.ndarray:
    return np.stack([cv2.GaussianBlur(f, (0, 0), sigma) for f in frames])


def motion_blur(frames: np.ndarray, length: int, angle_deg: float) -> np.ndarray:
    """A shaky-camera smear: a line kernel of ``length`` px at ``angle_deg``."""
    k = np.zeros((length, length), np.float32)
    c = (length - 1) / 2
    t = np.deg2rad(angle_deg)
    for s in np.linspace(-c, c, 4 * length):
        k[int(round(c + s * np.sin(t))), int(round(c + s * np.cos(t)))] = 1
    k /= k.sum()
    return np.stack([cv2.filter2D(f, -1, k) for f in frames])


def frozen(frames: np.ndarray, n: int) -> np.ndarray:
    """One real frame held for ``n`` frames: a slideshow slide or a still dressed as video."""
    return np.repeat(frames[:1], n, axis=0)


@dataclass
class DevVideo:
    name: str
    frames: list[np.ndarray]
    cuts: list[int] = field(default_factory=list)            # hard cuts and fade boundaries (see module doc)
    blacks: list[tuple[int, int]] = field(default_factory=list)  # [start, end) of fully black frames
    grayscale: bool = False


def join(name: str, parts: list[np.ndarray], fades: list[tuple[int, int] | None]) -> DevVideo:
    """Join ``parts``; ``fades[i]`` None joins parts i and i+1 with a hard cut, ``(fade_len, black_len)`` with a
    fade-out over the last fade_len frames of part i, black_len black frames, and a fade-in over the first fade_len
    frames of part i+1."""
    assert len(fades) == len(parts) - 1
    frames: list[np.ndarray] = []
    video = DevVideo(name, frames)
    parts = [p.astype(np.float32) for p in parts]
    for i, part in enumerate(parts):
        part = part.copy()
        before = fades[i - 1] if i > 0 else None
        after = fades[i] if i < len(fades) else None
        if before is not None:
            f = before[0]
            part[:f] *= ((np.arange(f) + 1) / (f + 1))[:, None, None, None]
        if after is not None:
            f = after[0]
            part[len(part) - f:] *= (1 - (np.arange(f) + 1) / (f + 1))[:, None, None, None]
        if i > 0:
            if before is None:
                video.cuts.append(len(frames))
        frames.extend(np.clip(part, 0, 255).round().astype(np.uint8))
        if after is not None:
            b0 = len(frames)
            frames.extend(np.zeros_like(frames[0]) for _ in range(after[1]))
            video.blacks.append((b0, len(frames)))
            video.cuts.append(b0 + after[1] // 2)
    return video


def cut_videos(media: Path, split: str) -> list[DevVideo]:
    """Hard-cut, fade and grayscale joins of real clips for one split (``"tune"`` or ``"check"``)."""
    s = lambda name, start, n: source(media, name, start, n)  # noqa: E731
    if split == "tune":
        a = [s("again.mkv", 0, 70), s("stream-of-water.webm", 0, 80), s("flower.webm", 0, 75),
             s("car-detection.mp4", 0, 70), s("bbb_480p_vp9_opus_1second.webm", 14, 10)]
        fast = [s("flower.webm", 60, 12), s("again.mkv", 40, 9), s("car-detection.mp4", 100, 14),
                s("stream-of-water.webm", 30, 10), s("bbb_480p_vp9_opus_1second.webm", 14, 10)]
        vids = [
            join("tune-hard", a, [None] * 4),
            join("tune-fast", [a[0], *fast, a[2]], [None] * 6),
            join("tune-fade", a, [(12, 6), (20, 0), (8, 15), None]),
            join("tune-gray", [gray(p) for p in a], [None, None, (15, 4), None]),
        ]
        vids[-1].grayscale = True
        return vids
    if split == "check":
        b = [s("friday.mp4", 20, 80), s("one-by-one-person-detection.mp4", 400, 60), s("stream-of-water.webm", 40, 50),
             s("bottle-detection.mp4", 300, 70), s("again.mkv", 30, 48), s("flower.webm", 70, 70),
             s("car-detection.mp4", 200, 66)]
        fast = [s("car-detection.mp4", 300, 11), s("flower.webm", 100, 8), s("stream-of-water.webm", 60, 13)]
        vids = [
            join("check-hard", b, [None] * 6),
            join("check-fast", [b[5], *fast, b[3]], [None] * 4),
            join("check-fade", b[1:6], [(24, 2), None, (10, 10), (30, 0)]),
            # friday.mp4 is a real black-and-white film; the others are grayscale copies
            join("check-gray", [b[0]] + [gray(p) for p in (b[2], b[4], b[6], b[5])], [(18, 8), None, (16, 3), None]),
        ]
        vids[3].grayscale = True
        return vids
    raise ValueError(f"split: expected 'tune' or 'check', got {split!r}")


def blur_sets(media: Path, split: str) -> list[tuple[str, np.ndarray, dict[str, np.ndarray]]]:
    """(name, sharp frames, {kind: blurred copy}) per real clip: defocus at two strengths and two motion smears."""
    if split == "tune":
        picks = [("again.mkv", 0), ("stream-of-water.webm", 0), ("flower.webm", 0), ("car-detection.mp4", 0)]
    elif split == "check":
        picks = [("friday.mp4", 60), ("bottle-detection.mp4", 500), ("one-by-one-person-detection.mp4", 800),
                 ("flower.webm", 80), ("car-detection.mp4", 250)]
    else:
        raise ValueError(f"split: expected 'tune' or 'check', got {split!r}")
    out = []
    for name, start in picks:
        sharp = source(media, name, start, 72)
        out.append((f"{name}@{start}", sharp, {
            "defocus1.5": defocus(sharp, 1.5), "defocus3": defocus(sharp, 3.0),
            "motion7": motion_blur(sharp, 7, 20.0), "motion13": motion_blur(sharp, 13, 100.0),
        }))
    return out


def calm_clips(media: Path) -> dict[str, np.ndarray]:
    """Real calm footage that must not count as static: tripod shots, a webcam, a timelapse (90 frames each)."""
    return {
        "bottle-detection (tripod, almost no change)": source(media, "bottle-detection.mp4", 30, 90),
        "one-by-one (tripod, empty room)": source(media, "one-by-one-person-detection.mp4", 30, 90),
        "car-detection (tripod, parking lot)": source(media, "car-detection.mp4", 0, 90),
        "again (webcam, one person)": source(media, "again.mkv", 0, 78),
        "flower (tripod timelapse)": source(media, "flower.webm", 0, 90),
        "friday (film, one shot)": source(media, "friday.mp4", 0, 90),
    }


def frozen_clips(media: Path) -> dict[str, np.ndarray]:
    """Frozen footage that must count as static: real frames held still."""
    return {
        "still again": frozen(source(media, "again.mkv", 20, 1), 90),
        "still car-detection": frozen(source(media, "car-detection.mp4", 40, 1), 90),
        "still friday": frozen(source(media, "friday.mp4", 40, 1), 90),
    }


def mjpeg_stream(media: Path, n: int = 40) -> bytes:
    """A raw MJPEG stream (concatenated JPEG frames, no container), as webcams and old capture tools write."""
    frames = source(media, "again.mkv", 0, n)
    out = []
    for f in frames:
        ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(f[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, 85])
        assert ok
        out.append(buf.tobytes())
    return b"".join(out)


def f1_within(found: list[int], truth: list[int], tol: int = 2) -> tuple[float, int, int, int]:
    """(F1, true positives, false positives, misses) matching each truth cut to at most one found cut within ``tol``."""
    used = set()
    tp = 0
    for t in truth:
        best = None
        for k, c in enumerate(found):
            if k not in used and abs(c - t) <= tol and (best is None or abs(c - t) < abs(found[best] - t)):
                best = k
        if best is not None:
            used.add(best)
            tp += 1
    fp, fn = len(found) - tp, len(truth) - tp
    f1 = 1.0 if not found and not truth else 2 * tp / (2 * tp + fp + fn)
    return f1, tp, fp, fn
