"""Synthetic clips for the scorer tests: numpy frames whose right answers are known by construction.

Imported by the scorer tests (not a conftest: helpers, not fixtures)."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

MEDIA = Path(__file__).resolve().parents[3] / ".." / "shared" / "media"
H, W = 192, 320
LOGO_BOX = (236, 14, 304, 46)  # x0, y0, x1, y1 px in a 320x192 frame: top-right corner bug


def texture(seed: int, h: int, w: int, cell: int = 6) -> np.ndarray:
    """Smooth random colour texture (natural-ish: energy at several scales), (h, w, 3) uint8."""
    rng = np.random.default_rng(seed)
    out = np.zeros((h, w, 3), np.float32)
    for c, amp in ((cell * 4, 0.6), (cell, 0.3), (max(2, cell // 3), 0.1)):
        small = rng.uniform(0, 255, (h // c + 2, w // c + 2, 3)).astype(np.float32)
        out += amp * cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    return np.clip(out, 0, 255).astype(np.uint8)


def panning(seed: int = 0, n: int = 24, speed: tuple[float, float] = (6.0, 2.0), h: int = H, w: int = W) -> np.ndarray:
    """Camera pan over a large texture: ``speed`` px per frame (x, y). (n, h, w, 3) uint8."""
    pad = int(np.ceil(max(abs(speed[0]), abs(speed[1])) * n)) + 4
    big = texture(seed, h + pad, w + pad)
    out = []
    for t in range(n):
        m = np.float32([[1, 0, -speed[0] * t - 2], [0, 1, -speed[1] * t - 2]])
        out.append(cv2.warpAffine(big, m, (w, h), flags=cv2.INTER_LINEAR))
    return np.stack(out)


def static(seed: int = 0, n: int = 24, h: int = H, w: int = W, noise: float = 0.0) -> np.ndarray:
    """A still image repeated; ``noise`` adds per-frame sensor noise of that std (luma levels)."""
    frame = texture(seed, h, w)
    frames = np.repeat(frame[None], n, axis=0).astype(np.float32)
    if noise:
        frames += np.random.default_rng(seed + 1).normal(0, noise, frames.shape)
    return np.clip(frames, 0, 255).astype(np.uint8)


def moving_object(seed: int = 0, n: int = 24, h: int = H, w: int = W) -> np.ndarray:
    """Static camera on a textured background with one square crossing it (surveillance-like)."""
    bg = texture(seed, h, w)
    obj = texture(seed + 99, 60, 60, cell=3)
    out = []
    for t in range(n):
        f = bg.copy()
        x = int(10 + (w - 80) * t / max(1, n - 1))
        y = int(h / 2 - 30 + 20 * np.sin(t / 3))
        f[y : y + 60, x : x + 60] = obj
        out.append(f)
    return np.stack(out)


def logo_mask(h: int = H, w: int = W, box: tuple[int, int, int, int] = LOGO_BOX) -> np.ndarray:
    """A channel-bug-like mark: a ring and three letter strokes inside ``box``, float mask (h, w) in [0, 1]."""
    x0, y0, x1, y1 = box
    m = np.zeros((h, w), np.uint8)
    r = (y1 - y0) // 2
    cv2.circle(m, (x0 + r, y0 + r), r - 1, 255, 3)
    cv2.putText(m, "TV", (x0 + 2 * r + 2, y1 - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.8, 255, 2, cv2.LINE_AA)
    return m.astype(np.float32) / 255.0


def with_logo(frames: np.ndarray, alpha: float = 0.45, color: tuple[int, int, int] = (255, 255, 255)) -> np.ndarray:
    """Blend a static translucent mark into every frame."""
    h, w = frames.shape[1:3]
    box = tuple(round(v * s) for v, s in zip(LOGO_BOX, (w / W, h / H, w / W, h / H)))
    a = (alpha * logo_mask(h, w, box))[None, ..., None]
    out = frames.astype(np.float32) * (1 - a) + np.asarray(color, np.float32) * a
    return np.clip(out, 0, 255).astype(np.uint8)


def logo_box_fraction(w: int = W, h: int = H) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = LOGO_BOX
    return x0 / W, y0 / H, x1 / W, y1 / H


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def blur(frames: np.ndarray, sigma: float) -> np.ndarray:
    return np.stack([cv2.GaussianBlur(f, (0, 0), sigma) for f in frames])


def decode_media(name: str, *, every: int = 1, limit: int | None = None, max_side: int = 384) -> tuple[np.ndarray, np.ndarray]:
    """Frames (N, H, W, 3) uint8 and their times (s) from ../shared/media, downscaled like the media layer."""
    av = pytest.importorskip("av")
    path = MEDIA / name
    if not path.is_file():
        pytest.skip(f"needs {path}")
    frames, times = [], []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        for i, frame in enumerate(container.decode(stream)):
            if i % every:
                continue
            rgb = frame.to_ndarray(format="rgb24")
            s = max_side / max(rgb.shape[:2])
            if s < 1:
                rgb = cv2.resize(rgb, (round(rgb.shape[1] * s), round(rgb.shape[0] * s)), interpolation=cv2.INTER_AREA)
            frames.append(rgb)
            times.append(float(frame.time))
            if limit is not None and len(frames) >= limit:
                break
    return np.stack(frames), np.asarray(times)


def handheld(seed: int = 0, n: int = 24, amp: float = 2.0, h: int = H, w: int = W) -> np.ndarray:
    """A still scene shaken by random sub-pixel jitter of about ``amp`` px, with a little sensor noise."""
    rng = np.random.default_rng(seed)
    big = texture(seed, h + 16, w + 16)
    out = []
    for _ in range(n):
        dx, dy = rng.uniform(-amp, amp, 2)
        m = np.float32([[1, 0, -8 + dx], [0, 1, -8 + dy]])
        f = cv2.warpAffine(big, m, (w, h), flags=cv2.INTER_LINEAR).astype(np.float32)
        out.append(np.clip(f + rng.normal(0, 2, f.shape), 0, 255).astype(np.uint8))
    return np.stack(out)
