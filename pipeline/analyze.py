"""The CPU stage: probe, decode once, cut scenes and compute the cheap scores of every clip.

One call per input file. Decoding happens exactly once: every frame goes to the scene detector, and a
thinned, downscaled subset is kept for the per-clip scorers and for the model stages downstream.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import media
from pipeline.scenecut import CutDetector, SceneCutConfig, clip_spans
from pipeline.scoring.motion import motion
from pipeline.scoring.overlay import static_overlay
from pipeline.scoring.sharpness import sharpness
from pipeline.settings import DecodeConfig, PrefilterConfig

CPU_STAGE_VERSION = "analyze-1"


@dataclass(frozen=True)
class ClipResult:
    record: dict[str, Any]          # a clips-table row (without run_id)
    frames: np.ndarray | None       # (N, H, W, 3) uint8 frames for the model stages; None when prefiltered
    times: np.ndarray | None        # (N,) seconds from clip start


@dataclass(frozen=True)
class VideoResult:
    uri: str
    video: dict[str, Any] | None = None     # a videos-table row (without run_id), None when rejected
    reject: dict[str, Any] | None = None    # a rejects-table row (without run_id)
    clips: list[ClipResult] = field(default_factory=list)


def uri_key(uri: str) -> str:
    """Stable key of an input location, for resume markers (the content hash names the video, not the file)."""
    return hashlib.sha1(uri.encode()).hexdigest()[:16]


def clip_id(video_id: str, start: int, end: int) -> str:
    return f"{video_id}:{start:07d}-{end:07d}"


def _reject(uri: str, video_id: str | None, stage: str, err: BaseException) -> VideoResult:
    return VideoResult(uri=uri, reject={
        "uri": uri, "video_id": video_id, "stage": stage,
        "error_class": type(err).__name__, "message": str(err) or repr(err),
    })


def _evenly(idx: np.ndarray, n: int) -> np.ndarray:
    if len(idx) <= n:
        return idx
    return idx[np.round(np.linspace(0, len(idx) - 1, n)).astype(int)]


def _every(times: np.ndarray, fps: float) -> np.ndarray:
    """Indices into ``times`` thinned to about ``fps`` samples per second (always at least one)."""
    if len(times) == 0:
        return np.zeros(0, dtype=int)
    keep, next_t = [], -np.inf
    for i, t in enumerate(times):
        if t >= next_t - 1e-6:
            keep.append(i)
            next_t = t + 1.0 / fps
    return np.asarray(keep, dtype=int)


def prefilter_reasons(rec: dict[str, Any], cfg: PrefilterConfig) -> list[str]:
    """Curation-time cut-offs on the cheap scores; model cut-offs are applied by their own stages."""
    reasons = []
    if cfg.sharpness_min is not None and rec["sharpness_median"] is not None and rec["sharpness_median"] < cfg.sharpness_min:
        reasons.append("blurry")
    if not rec["is_image"]:
        if cfg.motion_min is not None and rec["motion_mean"] is not None and rec["motion_mean"] < cfg.motion_min:
            reasons.append("static")
        if cfg.motion_max is not None and rec["motion_mean"] is not None and rec["motion_mean"] > cfg.motion_max:
            reasons.append("too_much_motion")
    if cfg.overlay_max is not None and rec["overlay_score"] is not None and rec["overlay_score"] > cfg.overlay_max:
        reasons.append("static_overlay")
    return reasons


def analyze_video(uri: str, decode: DecodeConfig, scenecut: SceneCutConfig, prefilter: PrefilterConfig) -> VideoResult:
    """Probe, decode once, cut, score. Never raises for bad media: that becomes a reject."""
    path = Path(uri)
    try:
        video_id = media.content_hash(path)
    except OSError as err:
        return _reject(uri, None, "read", err)
    try:
        t0 = time.perf_counter()
        info = media.probe(path, video_id=video_id)
        probe_s = time.perf_counter() - t0
    except media.MediaError as err:
        return _reject(uri, video_id, "probe", err)

    fps = info.fps if info.fps and info.fps > 0 else 1.0
    detector = None if info.is_image else CutDetector(scenecut, fps)
    kept: list[np.ndarray] = []
    kept_index: list[int] = []
    step = max(fps / decode.analysis_fps, 1.0)

    def keep(i: int) -> bool:  # about analysis_fps frames per second, the first frame always
        return i == 0 or int(i // step) != int((i - 1) // step)

    n_decoded = 0
    decoder = "pillow" if info.is_image else decode.backend
    try:
        if info.is_image or decode.backend == "decord":
            stream = media.open_frames(path, info, max_side=decode.max_side, backend="auto" if info.is_image else "decord")
            for index, frame in stream:
                n_decoded += 1
                if detector is not None:
                    detector.push(index, frame)
                if keep(index):
                    kept.append(frame)
                    kept_index.append(index)
            decoder = stream.decoder
        else:
            decoder = "pyav"
            for index, small, frame in media.iter_analysis(path, info, detect_width=scenecut.detect_width,
                                                           max_side=decode.max_side, keep=keep):
                n_decoded += 1
                detector.push_bgr(index, small)
                if frame is not None:
                    kept.append(frame)
                    kept_index.append(index)
        cuts = detector.finish() if detector is not None else []
    except media.MediaError as err:
        return _reject(uri, video_id, "decode", err)
    if n_decoded == 0:
        return _reject(uri, video_id, "decode", media.DecodeError(f"{uri}: expected at least one decodable frame, got none"))

    n_frames = max(n_decoded, 1)
    if info.is_image:
        spans = [(0, 1)]
    else:
        spans = clip_spans(cuts, n_frames, fps, scenecut)

    frames_all = np.stack(kept)                     # (K, h, w, 3) uint8
    index_all = np.asarray(kept_index)
    clips = []
    for start, end in spans:
        sel = np.nonzero((index_all >= start) & (index_all < end))[0]
        if len(sel) == 0:  # span narrower than the analysis step: take the nearest kept frame
            sel = np.asarray([int(np.argmin(np.abs(index_all - (start + end) / 2)))])
        frames = frames_all[sel]
        times = (index_all[sel] - start) / fps
        clips.append(_score_clip(info, video_id, start, end, fps, frames, times, decode, prefilter))

    row = info.to_row()
    row.update(
        probe_seconds=probe_s,
        decoder=decoder,
        frames=int(n_decoded) if not info.is_image else 1,
        cut_frames=[int(c) for c in cuts],
        cut_detector=None if detector is None else detector.name,
        num_clips=len(clips),
    )
    return VideoResult(uri=uri, video=row, clips=clips)


def _score_clip(info, video_id, start, end, fps, frames, times, decode: DecodeConfig, prefilter: PrefilterConfig) -> ClipResult:
    sharp = sharpness(frames)
    if info.is_image:
        mot = ovl = None
    else:
        msel = _every(times, decode.motion_fps)
        mot = motion(frames[msel], times[msel])
        ovl = static_overlay(frames)
    rec: dict[str, Any] = {
        "clip_id": clip_id(video_id, start, end),
        "video_id": video_id,
        "start_frame": int(start), "end_frame": int(end),
        "start_s": start / fps, "end_s": end / fps,
        "frames": int(end - start),
        "duration": 0.0 if info.is_image else (end - start) / fps,
        "fps": None if info.is_image else float(info.fps),
        "width": int(info.display_width), "height": int(info.display_height),
        "is_image": bool(info.is_image),
        "sharpness_min": float(sharp.min), "sharpness_median": float(sharp.median),
        "motion_mean": None if mot is None else float(mot.mean),
        "motion_max": None if mot is None else float(mot.max),
        "overlay_score": None if ovl is None else float(ovl.score),
        "overlay_box": None if ovl is None or ovl.box is None else [float(v) for v in ovl.box],
        "models": {},
        "stage_versions": {"analyze": CPU_STAGE_VERSION},
    }
    rec["reject_reasons"] = prefilter_reasons(rec, prefilter)
    if rec["reject_reasons"]:
        return ClipResult(rec, None, None)
    # Frames for the model stages: about model_fps, but enough for a captioner's frame budget.
    pick = _every(times, decode.model_fps)
    if len(pick) < decode.model_frames_max:
        pick = _evenly(np.arange(len(times)), decode.model_frames_max)
    pick = _evenly(pick, decode.model_frames_max)
    return ClipResult(rec, np.ascontiguousarray(frames[pick]), times[pick].astype(np.float32))
