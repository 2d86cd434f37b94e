"""The CPU stage: probe, decode once, cut scenes and compute the cheap scores of every clip.

One call per input file. Decoding happens exactly once: every frame goes to the scene detector, and a
thinned, downscaled subset is kept for the per-clip scorers and for the model stages downstream.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from pipeline import media
from pipeline.scenecut import CutDetector, SceneCutConfig, clip_spans
from pipeline.scoring._frames import luma
from pipeline.scoring.motion import motion
from pipeline.scoring.overlay import ClipMaps, Overlay, VideoOverlay, best_evidence, clip_overlay
from pipeline.scoring.sharpness import sharpness
from pipeline.settings import DecodeConfig, PrefilterConfig

CPU_STAGE_VERSION = "analyze-1"

# A scene longer than this many maximum clips (plus trim and the detector's lag) is cut into max_clip_s pieces
# while it streams; shorter ones are split into equal pieces once they close (scenecut.clip_spans), as before.
STREAM_SPLIT_CLIPS = 2
# Clip spans submitted to the scoring thread and not yet scored, at most (see iter_analyze's backpressure).
MAX_PENDING_SPANS = 4

# The clip preview stored in clips.preview_jpeg (the report's contact sheets): frames across the span, side by side.
PREVIEW_FRAMES = 3
PREVIEW_HEIGHT = 128    # px; the report shows it at 80 px, so it stays sharp on a high-density screen
PREVIEW_GAP = 3         # px of dark gap between frames, as the report's thumbnail row always had
PREVIEW_QUALITY = 80


@dataclass(frozen=True)
class ClipResult:
    record: dict[str, Any]          # a clips-table row (without run_id)
    frames: np.ndarray | None       # (N, H, W, 3) uint8 frames for the model stages; None when prefiltered
    times: np.ndarray | None        # (N,) seconds from clip start
    preview: bytes | None = None    # clips.preview_jpeg, kept apart from the JSON record (binary)
    overlay_maps: ClipMaps | None = None  # what the video-level overlay evidence needs of this clip


@dataclass(frozen=True)
class VideoResult:
    uri: str
    video: dict[str, Any] | None = None     # a videos-table row (without run_id), None when rejected
    reject: dict[str, Any] | None = None    # a rejects-table row (without run_id)
    clips: list[ClipResult] = field(default_factory=list)
    # [start, end) frame ranges that did not decode cleanly; no clip covers them (also videos.damaged_frames)
    damaged_frames: list[tuple[int, int]] = field(default_factory=list)


def uri_key(uri: str) -> str:
    """Stable key of an input location, for resume markers (the content hash names the video, not the file).

    From the path's bytes, so a name that is not valid UTF-8 (surrogate-escaped by Python) has a key too."""
    return hashlib.sha1(os.fsencode(uri)).hexdigest()[:16]


def shown(text: str) -> str:
    """``text`` as valid UTF-8 for the tables and logs: file-name bytes that are not UTF-8 (which Python keeps as
    surrogate escapes) become ``\\xNN``; valid text is unchanged."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that is no escaped byte
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def clip_id(video_id: str, start: int, end: int) -> str:
    return f"{video_id}:{start:07d}-{end:07d}"


def _reject(uri: str, video_id: str | None, stage: str, err: BaseException) -> VideoResult:
    return VideoResult(uri=uri, reject={
        "uri": shown(uri), "video_id": video_id, "stage": stage,
        "error_class": type(err).__name__, "message": shown(str(err) or repr(err)),
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


def preview_jpeg(frames: np.ndarray, times: np.ndarray, duration: float, *, n: int = PREVIEW_FRAMES,
                 height: int = PREVIEW_HEIGHT, quality: int = PREVIEW_QUALITY) -> bytes:
    """JPEG strip of up to ``n`` of ``frames`` (K, h, w, 3) RGB: those nearest the middles of n equal parts of the span.

    ``times`` (K,) are seconds from the clip start and ``duration`` the span's length; a still image or a span with
    one analysis frame gives a one-frame strip. Each frame is scaled to ``height`` keeping its aspect.
    """
    if len(frames) == 0:
        raise ValueError(f"expected at least one frame for a preview, got frames of shape {frames.shape}")
    if len(frames) == 1 or duration <= 0:
        pick = [0]
    else:
        targets = (np.arange(n) + 0.5) * duration / n
        pick = sorted({int(np.argmin(np.abs(times - t))) for t in targets})
    h, w = frames.shape[1:3]
    width = max(1, round(w * height / h))
    strip = np.full((height, len(pick) * (width + PREVIEW_GAP) - PREVIEW_GAP, 3), 17, dtype=np.uint8)
    for k, i in enumerate(pick):
        x = k * (width + PREVIEW_GAP)
        strip[:, x:x + width] = cv2.resize(frames[i], (width, height), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(strip[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError(f"JPEG encode of a {strip.shape} preview strip failed")
    return buf.tobytes()


def prefilter_reasons(rec: dict[str, Any], cfg: PrefilterConfig) -> list[str]:
    """Curation-time cut-offs on the cheap scores; model cut-offs are applied by their own stages."""
    reasons = []
    if cfg.sharpness_min is not None and rec.get("sharpness_low") is not None and rec["sharpness_low"] < cfg.sharpness_min:
        reasons.append("blurry")
    if not rec["is_image"]:
        if cfg.change_min is not None and rec.get("pixel_change") is not None and rec["pixel_change"] < cfg.change_min:
            reasons.append("static")
        if cfg.motion_min is not None and rec["motion_mean"] is not None and rec["motion_mean"] < cfg.motion_min:
            reasons.append("calm")
        if cfg.motion_max is not None and rec["motion_mean"] is not None and rec["motion_mean"] > cfg.motion_max:
            reasons.append("too_much_motion")
    if cfg.overlay_max is not None and rec["overlay_score"] is not None and rec["overlay_score"] > cfg.overlay_max:
        reasons.append("static_overlay")
    return reasons


def analyze_video(uri: str, decode: DecodeConfig, scenecut: SceneCutConfig, prefilter: PrefilterConfig) -> VideoResult:
    """Probe, decode once, cut, score. Never raises for bad media: that becomes a reject.

    Collects what ``iter_analyze`` streams; use that where the clips should leave as they are scored.
    """
    clips: list[ClipResult] = []
    for item in iter_analyze(uri, decode, scenecut, prefilter):
        if isinstance(item, ClipResult):
            clips.append(item)
        elif item.reject is not None:
            return item
        else:
            for c in clips:
                apply_video_overlay(c.record, item.video, prefilter.overlay_max)
            return dataclasses.replace(item, clips=clips)
    raise AssertionError("iter_analyze ended without its VideoResult")


def iter_analyze(uri: str, decode: DecodeConfig, scenecut: SceneCutConfig, prefilter: PrefilterConfig
                 ) -> Iterator[ClipResult | VideoResult]:
    """``analyze_video`` as a stream: each ``ClipResult`` as soon as it is scored, then one ``VideoResult`` last
    (its ``clips`` empty; ``video["num_clips"]`` says how many came before it). A reject may follow clips already
    yielded (a decode that fails without salvage after them): those clips then belong to no video.

    Sets OpenCV's thread count for the process it runs in to ``decode.opencv_threads`` (unless 0).

    Nothing an input does escapes: a non-MediaError anywhere becomes a reject (stage ``analyze``) and one raised
    while scoring a clip becomes that clip's ``score_failed`` reject reason. Memory: only the open scene's
    analysis frames are held, and a scene longer than ``STREAM_SPLIT_CLIPS`` maximum clips is cut into
    ``max_clip_s`` pieces as it streams, so a one-shot hour holds what a few clips need.
    """
    try:
        yield from _with_video_overlay(_iter_analyze(uri, decode, scenecut, prefilter))
    except Exception as err:  # noqa: BLE001 - one input's failure, whatever its class, stays that input's
        yield _reject(uri, None, "analyze", err)


def _iter_analyze(uri: str, decode: DecodeConfig, scenecut: SceneCutConfig, prefilter: PrefilterConfig
                  ) -> Iterator[ClipResult | VideoResult]:
    if decode.opencv_threads and cv2.getNumThreads() != decode.opencv_threads:
        cv2.setNumThreads(decode.opencv_threads)  # per process (see DecodeConfig.opencv_threads)
    path = Path(uri)
    try:
        video_id = media.content_hash(path)
    except OSError as err:
        yield _reject(uri, None, "read", err)
        return
    try:
        t0 = time.perf_counter()
        info = media.probe(path, video_id=video_id, max_pixels=decode.max_pixels)
        probe_s = time.perf_counter() - t0
    except media.MediaError as err:
        yield _reject(uri, video_id, "probe", err)
        return

    fps = info.fps if info.fps and info.fps > 0 else 1.0
    if info.is_image:
        try:
            stream = media.open_frames(path, info, max_side=decode.max_side)
            frames = np.stack([f for _, f in stream])                         # (1, h, w, 3)
        except media.MediaError as err:
            yield _reject(uri, video_id, "decode", err)
            return
        yield _guarded_clip(_score_clip, info, video_id, 0, 1, fps, frames, np.zeros(1), decode, prefilter)
        yield _video_result(uri, info, probe_s, stream.decoder, 1, [], None, 1)
        return

    step = max(fps / decode.analysis_fps, 1.0)

    def keep(i: int) -> bool:  # about analysis_fps frames per second, the first frame always
        return i == 0 or int(i // step) != int((i - 1) // step)

    detector = CutDetector(scenecut, fps)
    trim = round(scenecut.trim_s * fps)
    max_len = math.floor(scenecut.max_clip_s * fps + 1e-6)
    # A cut is reported some frames after it happens (the adaptive window, the min-scene flash filter): a piece
    # split off a long scene ends this far behind the newest frame, so no cut reported later can fall inside it.
    lag = detector.lag_frames
    split_at = STREAM_SPLIT_CLIPS * max_len + trim + lag
    # A scene is final once the cut after it is reported, so its clips are scored in a worker thread while
    # the decode goes on (OpenCV and NumPy release the GIL); only the open scene's frames stay in memory.
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="score")
    # Once the decode has ended, the clips still to score are all that runs: each one's motion goes to this second
    # thread while the first does the other scores, so the wait after the last frame is about half a clip's scoring.
    tail = ThreadPoolExecutor(max_workers=1, thread_name_prefix="score-tail")
    tail_helper: ThreadPoolExecutor | None = None
    futures: deque[Future] = deque()
    buf: list[tuple[int, np.ndarray]] = []
    scene_start = 0
    continued = False   # the open scene continues a piece split off it: no transition to trim at its start
    reported = 0
    n_clips = 0

    def submit(spans: list[tuple[int, int]], end: int) -> None:
        nonlocal buf
        scene = [(i, f) for i, f in buf if i < end]
        buf = [(i, f) for i, f in buf if i >= end]
        for s, e in spans:
            futures.append(pool.submit(_guarded_clip, _score_span, info, video_id, s, e, fps, scene, decode,
                                       prefilter, tail_helper))

    def close_scene(end: int) -> None:
        nonlocal scene_start, continued
        origin = scene_start - trim if continued else scene_start  # clip_spans trims `trim` off the start
        submit([(s + origin, e + origin) for s, e in clip_spans([], end - origin, fps, scenecut)], end)
        scene_start, continued = end, False

    def boundary(end: int, start: int) -> None:
        """The scene before ends at ``end``; the next starts at ``start`` (later than ``end`` after a fade or black)."""
        nonlocal scene_start, continued, buf
        if end > scene_start:
            close_scene(end)
        if start > scene_start:
            scene_start, continued = start, False
            buf = [(i, f) for i, f in buf if i >= start]

    def split_piece() -> None:
        nonlocal scene_start, continued
        s = scene_start if continued else scene_start + trim
        submit([(s, s + max_len)], s + max_len)
        scene_start, continued = s + max_len, True

    def finished() -> Iterator[ClipResult]:
        nonlocal n_clips
        # Backpressure: the decode runs far ahead of scoring on a long shot; past MAX_PENDING_SPANS spans waiting
        # (each holding its scene's frames) it waits for the oldest, so what is held stays bounded.
        while futures and (futures[0].done() or len(futures) > MAX_PENDING_SPANS):
            n_clips += 1
            yield futures.popleft().result()

    n_decoded = 0
    last = -1
    damage: list[tuple[int, int]] = []  # frame ranges the decode could not deliver cleanly (salvaged around)
    try:
        if decode.backend == "decord":
            source = ((i, None, f) for i, f in media.open_frames(path, info, max_side=decode.max_side, backend="decord"))
        else:
            source = media.iter_analysis(path, info, detect_width=scenecut.detect_width, max_side=decode.max_side,
                                         keep=keep, damage=damage, threads=decode.threads)
        for index, small, frame in source:
            n_decoded += 1
            if index != last + 1:  # frames [last + 1, index) are damaged: close the scene before, no clip spans them
                if scene_start <= last:
                    close_scene(last + 1)
                scene_start, continued = index, False
            last = index
            if small is None:
                detector.push(index, frame)
                frame = frame if keep(index) else None
            else:
                detector.push_bgr(index, small)
            if frame is not None:
                buf.append((index, frame))
            bounds = detector.boundaries_so_far
            while reported < len(bounds):
                boundary(*bounds[reported])
                reported += 1
            if last + 1 - scene_start >= split_at:
                split_piece()
            yield from finished()
        cuts = detector.finish()
        tail_helper = tail
        for b in detector.boundaries_so_far[reported:]:  # the ones the end-of-stream flush released
            boundary(*b)
        close_scene(last + 1)
        while futures:
            n_clips += 1
            yield futures.popleft().result()
    except media.MediaError as err:
        yield _reject(uri, video_id, "decode", err)
        return
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        tail.shutdown(wait=True, cancel_futures=True)
    yield _video_result(uri, info, probe_s, media.analysis_decoder(info) if decode.backend != "decord" else "decord",
                        n_decoded, cuts, detector.name, n_clips, damage, scenes=_scene_fields(
                            detector, info, scenecut, n_clips, damage))


def _guarded_clip(score, info, video_id, start, end, fps, *args) -> ClipResult:
    """``score(info, video_id, start, end, fps, *args)``; whatever it raises becomes this clip's reject reason."""
    try:
        return score(info, video_id, start, end, fps, *args)
    except Exception as err:  # noqa: BLE001 - one clip's failure must not lose its video's other clips
        rec: dict[str, Any] = {
            "clip_id": clip_id(video_id, start, end), "video_id": video_id,
            "start_frame": int(start), "end_frame": int(end), "start_s": start / fps, "end_s": end / fps,
            "frames": int(end - start), "duration": 0.0 if info.is_image else (end - start) / fps,
            "fps": None if info.is_image else float(info.fps),
            "width": int(info.display_width), "height": int(info.display_height), "is_image": bool(info.is_image),
            "models": {}, "stage_versions": {"analyze": CPU_STAGE_VERSION},
            "reject_reasons": [f"score_failed: {type(err).__name__}: {err}"[:300]],
        }
        return ClipResult(rec, None, None, None)


def _score_span(info, video_id, start, end, fps, scene, decode: DecodeConfig, prefilter: PrefilterConfig,
                helper: ThreadPoolExecutor | None = None) -> ClipResult:
    index = np.asarray([i for i, _ in scene])
    sel = [k for k, i in enumerate(index) if start <= i < end]
    if not sel:  # a span narrower than the analysis step: the nearest kept frame stands for it
        sel = [int(np.argmin(np.abs(index - (start + end) / 2)))]
    frames = np.stack([scene[k][1] for k in sel])   # (K, h, w, 3) uint8
    times = (index[sel] - start) / fps
    return _score_clip(info, video_id, start, end, fps, frames, times, decode, prefilter, helper)


def _scene_fields(detector: CutDetector, info, scenecut: SceneCutConfig, n_clips: int, damage) -> dict[str, Any]:
    """The videos columns the scene detector fills: fades, grayscale, and why a video gave no clip."""
    reason = None
    if n_clips == 0:
        if detector.all_black:
            reason = "all_black"
        elif info.duration < scenecut.min_clip_s + 2 * scenecut.trim_s:
            reason = "too_short"
        elif damage:
            reason = "damaged"
        elif sum(t.end - t.start for t in detector.transitions) >= 0.5 * max(1, info.frames):
            reason = "mostly_black"
        else:
            reason = "scenes_too_short"
    return dict(fade_frames=[[t.start, t.end] for t in detector.transitions], is_grayscale=detector.is_grayscale,
                no_clip_reason=reason)


def _video_result(uri, info, probe_s, decoder, n_decoded, cuts, detector_name, n_clips, damage=(),
                  scenes: dict[str, Any] | None = None) -> VideoResult:
    damaged = [(int(a), int(b)) for a, b in damage]
    row = info.to_row()
    row.update(
        uri=shown(row["uri"]),
        probe_seconds=probe_s,
        decoder=decoder,
        frames=int(n_decoded),
        cut_frames=[int(c) for c in cuts],
        cut_detector=detector_name,
        num_clips=int(n_clips),
        damaged_frames=[list(r) for r in damaged],
        **(scenes or {"fade_frames": [], "is_grayscale": None, "no_clip_reason": None}),
    )
    return VideoResult(uri=uri, video=row, damaged_frames=damaged)


def _score_clip(info, video_id, start, end, fps, frames, times, decode: DecodeConfig, prefilter: PrefilterConfig,
                helper: ThreadPoolExecutor | None = None) -> ClipResult:
    """Score one clip's (K, h, w, 3) frames; with ``helper``, its motion runs there alongside the other scores."""
    gray = luma(frames)  # (K, h, w): every scorer works on luma
    moving = None
    if not info.is_image:
        msel = _every(times, decode.motion_fps)
        moving = helper.submit(motion, frames[msel], times[msel], luma=gray[msel]) if helper is not None else None
    sharp = sharpness(frames, luma=gray)
    if info.is_image:
        mot = ovl = maps = None
    else:
        ovl, maps = clip_overlay(frames, luma=gray)
        mot = moving.result() if moving is not None else motion(frames[msel], times[msel], luma=gray[msel])
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
        "sharpness_min": float(sharp.min), "sharpness_low": float(sharp.low), "sharpness_median": float(sharp.median),
        "motion_mean": None if mot is None else float(mot.mean),
        "motion_max": None if mot is None else float(mot.max),
        "pixel_change": None if mot is None else float(mot.change),
        "overlay_score": None if ovl is None else float(ovl.score),
        "overlay_box": None if ovl is None or ovl.box is None else [float(v) for v in ovl.box],
        "overlay_clip_score": None if ovl is None else float(ovl.score),
        "models": {},
        "stage_versions": {"analyze": CPU_STAGE_VERSION},
    }
    rec["reject_reasons"] = prefilter_reasons(rec, prefilter)
    # Every clip, rejected ones too (the report shows both), from the frames already in hand: no second decode.
    preview = preview_jpeg(frames, times, rec["duration"])
    if rec["reject_reasons"]:
        return ClipResult(rec, None, None, preview, maps)
    # Frames for the model stages: about model_fps, but enough for a captioner's frame budget.
    pick = _every(times, decode.model_fps)
    if len(pick) < decode.model_frames_max:
        pick = _evenly(np.arange(len(times)), decode.model_frames_max)
    pick = _evenly(pick, decode.model_frames_max)
    return ClipResult(rec, np.ascontiguousarray(frames[pick]), times[pick].astype(np.float32), preview, maps)


def _with_video_overlay(items: Iterator[ClipResult | VideoResult]) -> Iterator[ClipResult | VideoResult]:
    """Pass the stream on, pooling each clip's overlay maps; the video row gets the evidence across its scenes.

    Clips leave before the video is whole, so their records carry only their own evidence here: the run's writer
    (and ``analyze_video``) applies the video's with :func:`apply_video_overlay` once the video row arrives.
    """
    pooled = VideoOverlay()   # running totals: bounded, however many clips the video has
    for item in items:
        if isinstance(item, ClipResult):
            pooled.add(item.overlay_maps)
            # Folded into the totals: the maps go no further, so whoever keeps the clips does not keep them too.
            item = dataclasses.replace(item, overlay_maps=None)
        elif item.video is not None and not item.video.get("is_image"):
            ovl = pooled.result()
            item.video["overlay_score"] = None if ovl is None else float(ovl.score)
            item.video["overlay_box"] = None if ovl is None or ovl.box is None else [float(v) for v in ovl.box]
        yield item


def apply_video_overlay(rec: dict[str, Any], video: dict[str, Any], overlay_max: float | None) -> dict[str, Any]:
    """Give a clip record its video's overlay evidence (``overlay_video_*``) and make ``overlay_score``/``_box`` the
    stronger of the clip's and the video's; a clip the video's evidence puts over ``overlay_max`` is dropped."""
    v_score, v_box = video.get("overlay_score"), video.get("overlay_box")
    rec["overlay_video_score"], rec["overlay_video_box"] = v_score, v_box
    if rec.get("overlay_clip_score") is None:  # a still image, or a clip whose scoring failed
        return rec
    own = Overlay(float(rec["overlay_clip_score"]), tuple(rec["overlay_box"]) if rec.get("overlay_box") else None)
    best = best_evidence(own, None if v_score is None else Overlay(float(v_score), tuple(v_box) if v_box else None))
    rec["overlay_score"] = best.score
    rec["overlay_box"] = None if best.box is None else [float(v) for v in best.box]
    if overlay_max is not None and best.score > overlay_max and "static_overlay" not in rec["reject_reasons"]:
        rec["reject_reasons"].append("static_overlay")
    return rec
