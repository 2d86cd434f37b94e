"""Camera/subject motion: dense optical flow (Farneback) between frames sampled at about 2 fps, and pixel change.

Flow speed says how much moves; ``change`` says whether anything changes at all. Only the second tells frozen
footage (what the prefilter drops as "static") from a calm talking head or a tripod shot, which flow puts at
0.3-1 px/s like a still.

Speeds are pixels per second measured on a frame whose longer side is ``REF_SIDE`` (256) px, so the
number means the same for every input size: 20 px/s is a slow pan crossing the frame in ~13 s.
Flow is computed at ``WORK_SIDE`` px (a global speed needs no fine texture, and Farneback's cost grows
with area) and scaled to the reference size.

Half a second apart, a pan moves the picture further than Farneback's pyramid can follow (it loses
track beyond ~24 px at 256 px). So each pair first gets a global shift from phase correlation, which
Farneback then refines per pixel; a static shot keeps a zero start so sensor noise is not inflated.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from pipeline.scoring._frames import check_frames, check_luma, shrink, working_size

REF_SIDE = 256
# "Static" means frozen: no pixel change beyond codec noise, measured at the analysis size (no downscale averages
# the change away). On real footage after H.264 (tests/pipeline/devset.py), frames ~0.5 s apart: held stills change
# <= 0.04 % of their pixels by more than 6 levels; calm tripod shots (an empty room, a parking lot, a near-still
# bottle), a webcam and a timelapse 1.4-31 % (median over pairs).
CHANGE_LEVEL = 6
WORK_SIDE = 160
_FARNEBACK = dict(pyr_scale=0.5, levels=3, winsize=13, iterations=2, poly_n=5, poly_sigma=1.1)
# Shifts below this (working px) are left to Farneback alone, which tracks them exactly; a sub-pixel
# global estimate on a static shot with one moving object would only bias every static pixel.
_SHIFT_MIN_PX = 2.0
# ...and the shifted frame must match at least this much better than the unshifted one.
_SHIFT_BETTER = 0.7
# The flow started from the shift replaces the plain one when its error is at least this much lower.
_START_BETTER = 0.9


@dataclass(frozen=True, slots=True)
class Motion:
    mean: float
    """Mean over frame pairs of the mean flow speed (px/s at 256 px longer side); ~0 for a static shot."""
    max: float
    """Largest per-pair mean flow speed (same units): catches a whip pan or a jump inside the clip."""
    change: float
    """Median over frame pairs of the share of pixels whose luma changed by more than ``CHANGE_LEVEL``: ~0 only
    for frozen footage (a still or slideshow dressed as video), however calm the scene."""


def _explains(prev: np.ndarray, cur: np.ndarray, dx: float, dy: float) -> bool:
    """Whether shifting by (dx, dy) explains the pair better than no motion: a camera move, not one
    large object (whose shift, applied to the static background, would invent motion everywhere)."""
    h, w = prev.shape
    ix, iy = round(dx), round(dy)  # whole pixels: interpolation would smooth noise and "explain" it
    m = max(abs(ix), abs(iy))
    if 4 * m >= min(h, w):
        return True  # too little overlap left to check; phase correlation's peak is all we have
    inner = prev[m : h - m, m : w - m]
    moved = cv2.absdiff(inner, cur[m + iy : h - m + iy, m + ix : w - m + ix]).mean()
    still = cv2.absdiff(inner, cur[m : h - m, m : w - m]).mean()
    return bool(moved < _SHIFT_BETTER * still)


def _residual(prev: np.ndarray, cur: np.ndarray, flow: np.ndarray, grid: np.ndarray, valid: np.ndarray) -> float:
    """Mean absolute luma error, over ``valid`` pixels, of ``prev`` predicted by sampling ``cur`` along ``flow``."""
    warped = cv2.remap(cur, grid + flow, None, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return float(cv2.absdiff(prev, warped)[valid].mean())


def motion(frames: np.ndarray, times_s: np.ndarray, *, luma: np.ndarray | None = None) -> Motion:
    """Flow speed between consecutive (N, H, W, 3) uint8 RGB frames taken at ``times_s`` (seconds, increasing).

    ``luma``: the frames' (N, H, W) luma (``_frames.luma``) when the caller has it already."""
    frames = check_frames(frames, "motion")
    times_s = np.asarray(times_s, dtype=np.float64)
    if times_s.shape != (len(frames),):
        raise ValueError(f"motion: expected one time per frame, shape ({len(frames)},), got {times_s.shape}")
    if len(frames) == 0:
        raise ValueError("motion: expected at least one frame, got 0")
    dts = np.diff(times_s)
    if not np.all(np.isfinite(times_s)) or np.any(dts <= 0):
        raise ValueError(f"motion: expected finite, strictly increasing times, got {times_s.tolist()}")
    if len(frames) == 1:
        return Motion(mean=0.0, max=0.0, change=0.0)
    lumas = check_luma(luma, frames, "motion")
    change = float(np.median([cv2.countNonZero(cv2.threshold(cv2.absdiff(a, b), CHANGE_LEVEL, 1, cv2.THRESH_BINARY)[1])
                              / a.size for a, b in zip(lumas, lumas[1:])]))

    h, w = frames.shape[1:3]
    size = working_size(h, w, min(WORK_SIDE, max(h, w)))
    to_ref = REF_SIDE / max(size)  # working px -> px at REF_SIDE
    window = cv2.createHanningWindow(size, cv2.CV_32F)
    init = np.zeros((size[1], size[0], 2), np.float32)  # (h, w, 2) starting flow
    gx, gy = np.meshgrid(np.arange(size[0], dtype=np.float32), np.arange(size[1], dtype=np.float32))
    grid = np.dstack([gx, gy])                          # (h, w, 2) pixel coordinates for remap
    prev = shrink(lumas[0], size)
    speeds = []
    for gray, dt in zip(lumas[1:], dts):
        cur = shrink(gray, size)
        flow = cv2.calcOpticalFlowFarneback(prev, cur, None, flags=0, **_FARNEBACK)  # (h, w, 2) px
        # The peak's height is no guide (a true 50 px pan can score ~0): _explains checks the shift instead.
        (dx, dy), _ = cv2.phaseCorrelate(prev.astype(np.float32), cur.astype(np.float32), window)
        if np.hypot(dx, dy) >= _SHIFT_MIN_PX and _explains(prev, cur, dx, dy):
            init[..., 0], init[..., 1] = dx, dy
            started = cv2.calcOpticalFlowFarneback(prev, cur, init.copy(), flags=cv2.OPTFLOW_USE_INITIAL_FLOW, **_FARNEBACK)
            # On repetitive texture a shift by one period matches too: keep the larger motion only when
            # it explains the pair clearly better than the flow found without it.
            # Both are judged where the shifted view still overlaps the frame (the strip a pan uncovers
            # has no counterpart in ``cur``).
            target = grid + started
            valid = (target[..., 0] >= 0) & (target[..., 0] <= size[0] - 1) & (target[..., 1] >= 0) & (target[..., 1] <= size[1] - 1)
            if valid.mean() > 0.25 and _residual(prev, cur, started, grid, valid) < _START_BETTER * _residual(prev, cur, flow, grid, valid):
                flow = started
        speed = float(np.mean(np.sqrt(flow[..., 0] ** 2 + flow[..., 1] ** 2)))  # working px per pair
        speeds.append(speed * to_ref / dt)
        prev = cur
    return Motion(mean=float(np.mean(speeds)), max=float(np.max(speeds)), change=change)
