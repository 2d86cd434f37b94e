"""Scene-cut detection on a decoded frame stream, and clip spans from the cuts.

The media layer decodes each video once and pushes every frame into a :class:`CutDetector`;
PySceneDetect's detectors do the scoring. Frames are shrunk to ``detect_width`` first: the
detectors work on whole-frame HSV differences, so a 160 px frame finds the same hard cuts as a
full-size one at a fraction of the cost (PySceneDetect's own ``auto_downscale`` targets 256 px).

Frame numbers are 0-based everywhere. A cut at frame ``c`` means a new scene starts at ``c``.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
from scenedetect import FrameTimecode
from scenedetect.detectors import AdaptiveDetector, ContentDetector

from catalog.config import ConfigError

DETECTORS = ("adaptive", "content")


@dataclass(frozen=True, kw_only=True, slots=True)
class SceneCutConfig:
    """TOML section ``[scenecut]``."""

    detector: str = "adaptive"
    """``"adaptive"`` (rolling-average ratio; best on hard cuts and camera motion) or ``"content"``
    (fixed threshold on the HSV/edge difference; better on fades)."""
    luma_only: bool = False
    """Score only luma changes: needed for black-and-white footage, where hue/saturation are noise."""
    detect_width: int = 160
    """Frames are downscaled to this width before detection; the main speed lever."""
    adaptive_threshold: float = 3.0
    """Adaptive detector: a frame's score must exceed this multiple of its neighbours' average."""
    min_content_val: float = 15.0
    """Adaptive detector: and the frame's content score must be at least this."""
    content_threshold: float = 27.0
    """Content detector: the frame's content score must be at least this."""
    min_scene_s: float = 0.6
    """No two cuts closer than this (seconds); suppresses flashes and strobes."""
    trim_s: float = 0.25
    """Dropped at each end of a scene so clips carry no half-faded frames from a transition."""
    min_clip_s: float = 2.0
    """Clips shorter than this (after trimming) are dropped."""
    max_clip_s: float = 10.0
    """Longer scenes are split into equal pieces no longer than this."""

    def __post_init__(self) -> None:
        if self.detector not in DETECTORS:
            raise ConfigError(f"[scenecut] detector: expected one of {list(DETECTORS)}, got {self.detector!r}")
        if self.detect_width < 16:
            raise ConfigError(f"[scenecut] detect_width: expected >= 16 px, got {self.detect_width}")
        for name in ("min_scene_s", "trim_s"):
            if getattr(self, name) < 0:
                raise ConfigError(f"[scenecut] {name}: expected >= 0, got {getattr(self, name)}")
        if not 0 < self.min_clip_s <= self.max_clip_s:
            raise ConfigError(
                f"[scenecut] expected 0 < min_clip_s <= max_clip_s, got min_clip_s={self.min_clip_s}, "
                f"max_clip_s={self.max_clip_s}"
            )


def _check_fps(fps: float) -> None:
    if not (fps > 0 and math.isfinite(fps)):
        raise ValueError(f"fps: expected a positive finite number, got {fps!r}")


class CutDetector:
    """Streaming scene-cut detector: ``push`` every decoded frame in order, then ``finish``.

    Args:
        cfg: the ``[scenecut]`` settings.
        fps: the video's (average) frame rate; turns ``min_scene_s`` into frames.
    """

    def __init__(self, cfg: SceneCutConfig, fps: float) -> None:
        _check_fps(fps)
        self.cfg = cfg
        self.fps = float(fps)
        # An int length makes the detectors compare frame counts exactly (no float rounding at NTSC rates).
        self._min_len = max(1, round(cfg.min_scene_s * fps))
        if cfg.detector == "adaptive":
            self._detector = AdaptiveDetector(
                adaptive_threshold=cfg.adaptive_threshold,
                min_scene_len=self._min_len,
                min_content_val=cfg.min_content_val,
                luma_only=cfg.luma_only,
            )
        else:
            self._detector = ContentDetector(
                threshold=cfg.content_threshold, min_scene_len=self._min_len, luma_only=cfg.luma_only
            )
        self._cuts: list[int] = []
        self._last_index = -1
        # The adaptive detector judges frame i only once it has seen frames i+1..i+window; keep
        # that many recent (small, BGR) frames so finish() can feed a mirrored tail.
        self._recent: list[np.ndarray] = []
        self._finished = False

    @property
    def name(self) -> str:
        c = self.cfg
        if c.detector == "adaptive":
            head = f"adaptive(t={c.adaptive_threshold},min={c.min_content_val}"
        else:
            head = f"content(t={c.content_threshold}"
        return f"{head},len={c.min_scene_s}s,luma={c.luma_only},w={c.detect_width})"

    def _small_bgr(self, frame_rgb: np.ndarray) -> np.ndarray:
        if frame_rgb.ndim != 3 or frame_rgb.shape[2] != 3 or frame_rgb.dtype != np.uint8:
            raise ValueError(f"frame: expected (H, W, 3) uint8 RGB, got {frame_rgb.shape} {frame_rgb.dtype}")
        h, w = frame_rgb.shape[:2]
        if w > self.cfg.detect_width:
            size = (self.cfg.detect_width, max(1, round(h * self.cfg.detect_width / w)))
            # Bilinear, as PySceneDetect's own downscale does: area averaging costs 5x more per frame and
            # cut detection compares whole-frame colour statistics, which aliasing barely moves.
            frame_rgb = cv2.resize(frame_rgb, size, interpolation=cv2.INTER_LINEAR)
        return cv2.cvtColor(frame_rgb, cv2.COLOR_RGB2BGR)

    def _feed(self, index: int, bgr: np.ndarray) -> None:
        for tc in self._detector.process_frame(FrameTimecode(index, self.fps), bgr):
            self._cuts.append(tc.frame_num)

    @property
    def cuts_so_far(self) -> list[int]:
        """Cuts reported so far. A reported cut is final; later ones only come after it."""
        return self._cuts

    def push_bgr(self, index: int, small_bgr: np.ndarray) -> None:
        """Feed frame ``index`` already reduced to about ``detect_width`` wide, in BGR (the decode path
        that builds it straight from the YUV planes skips a full-size RGB conversion)."""
        if self._finished:
            raise RuntimeError("CutDetector.push after finish(); make a new detector per video")
        if index <= self._last_index:
            raise ValueError(f"frame index: expected > {self._last_index} (strictly increasing), got {index}")
        self._feed(index, small_bgr)
        self._last_index = index
        self._recent.append(small_bgr)
        del self._recent[:-3]

    def push(self, index: int, frame_rgb: np.ndarray) -> None:
        """Feed frame ``index`` (0-based, strictly increasing) as an (H, W, 3) uint8 RGB array."""
        self.push_bgr(index, self._small_bgr(frame_rgb))

    def finish(self) -> list[int]:
        """Flush the detector's look-behind and return the sorted frames where new scenes start (never 0)."""
        if not self._finished and self._last_index >= 0:
            self._finished = True
            n = self._last_index + 1
            if isinstance(self._detector, AdaptiveDetector):
                # Mirror the last frames (…, f[n-3], f[n-2], f[n-1] | f[n-2], f[n-3]) so the final
                # `window_width` frames get judged against real neighbour scores instead of never.
                tail = self._recent[-2::-1][: self._detector.window_width]
                while len(tail) < self._detector.window_width:
                    tail.append(self._recent[-1])
            else:
                # Repeats score 0, which releases a cut the flash filter is still holding back.
                tail = [self._recent[-1]] * (self._min_len + 1)
            for k, bgr in enumerate(tail):
                self._feed(n + k, bgr)
        self._finished = True
        n = self._last_index + 1
        return sorted({c for c in self._cuts if 0 < c < n})


def detect_cuts(frames: Iterable[np.ndarray], fps: float, cfg: SceneCutConfig) -> list[int]:
    """Cuts (0-based frames where a new scene starts) in a sequence of (H, W, 3) uint8 RGB frames."""
    det = CutDetector(cfg, fps)
    for i, frame in enumerate(frames):
        det.push(i, frame)
    return det.finish()


def clip_spans(cuts: Sequence[int], n_frames: int, fps: float, cfg: SceneCutConfig) -> list[tuple[int, int]]:
    """Turn cuts into clip spans ``[start, end)`` (frame numbers) that respect the clip limits.

    Scenes are ``[0, c1), [c1, c2), …, [ck, n)``. Each loses ``trim_s`` at both ends; what is left
    shorter than ``min_clip_s`` is dropped; what is longer than ``max_clip_s`` is split into the
    fewest equal pieces no longer than ``max_clip_s``. When no equal split keeps every piece at
    least ``min_clip_s`` long (possible only when ``max_clip_s < 2 * min_clip_s``), back-to-back
    pieces of ``max_clip_s`` are taken and the remainder dropped.
    """
    _check_fps(fps)
    if n_frames < 0:
        raise ValueError(f"n_frames: expected >= 0, got {n_frames}")
    trim = round(cfg.trim_s * fps)
    # A tolerance keeps exact multiples (2.0 s at 24 fps = 48 frames) on the right side of the limit.
    min_len = max(1, math.ceil(cfg.min_clip_s * fps - 1e-6))
    max_len = math.floor(cfg.max_clip_s * fps + 1e-6)
    if max_len < min_len:
        raise ValueError(
            f"clip limits min_clip_s={cfg.min_clip_s}, max_clip_s={cfg.max_clip_s} leave no whole-frame "
            f"length at {fps} fps"
        )
    bounds = [0, *sorted({int(c) for c in cuts if 0 < c < n_frames}), n_frames]
    spans: list[tuple[int, int]] = []
    for s, e in zip(bounds, bounds[1:]):
        s, e = s + trim, e - trim
        length = e - s
        if length < min_len:
            continue
        pieces = math.ceil(length / max_len)
        if length // pieces >= min_len:
            edges = [s + round(i * length / pieces) for i in range(pieces + 1)]
            spans += list(zip(edges, edges[1:]))
        else:
            spans += [(s + i * max_len, s + (i + 1) * max_len) for i in range(length // max_len)]
    return spans
