"""Generated media and catalog rows for the shard tests (pipeline, catalog and jobs).

Every source frame i is black with a centred disc of grey level ``code(i)``, so a decoded sample
tells which source frame it came from (the disc's mean) and whether it was stretched (the disc's
bounding box stays round).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image

from catalog import schema
from catalog.shards import encode_h264
from pipeline.buckets import BucketConfig

# Small buckets keep the tests fast; the rules are the same as the production table's.
SMALL_BUCKETS = BucketConfig(
    frames=(1, 9, 17), fps=8.0,
    resolutions=("128x128", "96x160", "160x96", "64x192", "48x144"),
    max_upscale=1.1,
)


def code(i: int) -> int:
    """Grey level of source frame i: neighbours differ by 10 levels (two lossy encodes move a level by
    at most ~3), repeating every 23 frames; no test span starts at a multiple of 23."""
    return 16 + 10 * (i % 23)


def disc_frame(i: int, width: int, height: int) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width]
    r = 0.35 * min(width, height)
    inside = (xx - (width - 1) / 2) ** 2 + (yy - (height - 1) / 2) ** 2 <= r * r
    frame = np.zeros((height, width, 3), dtype=np.uint8)
    frame[inside] = code(i)
    return frame


def make_video(path: Path, width: int, height: int, fps: int, frames: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    # crf 10: the source's own coding error stays far below the 10 levels between neighbouring codes.
    path.write_bytes(encode_h264([disc_frame(i, width, height) for i in range(frames)], fps, options={"crf": "10"}))
    return path


def make_image(path: Path, width: int, height: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(disc_frame(40, width, height)).save(path, quality=95)
    return path


def disc_box(frame: np.ndarray) -> tuple[int, int]:
    """(width, height) of the bright disc in an RGB frame."""
    mask = frame.mean(axis=2) > 8
    ys, xs = np.nonzero(mask)
    return int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)


def centre_code(frame: np.ndarray) -> float:
    h, w = frame.shape[:2]
    return float(frame[h // 2 - 4 : h // 2 + 4, w // 2 - 4 : w // 2 + 4].mean())


def video_id(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def video_row(path: Path, run_id: str, *, width: int, height: int, fps: float | None, frames: int,
              is_image: bool = False) -> dict:
    return {
        "video_id": video_id(path), "uri": str(path), "bytes": path.stat().st_size,
        "container": "image/jpeg" if is_image else "mp4", "codec": "mjpeg" if is_image else "h264",
        "width": width, "height": height, "rotation": 0, "sample_aspect": 1.0,
        "display_width": width, "display_height": height, "display_aspect": width / height,
        "fps": fps, "fps_variable": False, "frames": frames,
        "duration": None if is_image else frames / fps, "has_audio": False, "is_image": is_image,
        "decoder": "pillow" if is_image else "pyav", "probe_seconds": 0.01, "cut_frames": [0],
        "cut_detector": "test", "num_clips": 1, "run_id": run_id,
    }


def clip_row(video: dict, start: int, end: int, *, aesthetic: float, caption: str | None) -> dict:
    is_image, fps = video["is_image"], video["fps"]
    return {
        "clip_id": f"{video['video_id']}:{start}-{end}", "video_id": video["video_id"],
        "start_frame": start, "end_frame": end,
        "start_s": 0.0 if is_image else start / fps, "end_s": 0.0 if is_image else end / fps,
        "frames": end - start, "duration": 0.0 if is_image else (end - start) / fps, "fps": fps,
        "width": video["display_width"], "height": video["display_height"], "is_image": is_image,
        "sharpness_min": 0.5, "sharpness_median": 0.6, "motion_mean": None if is_image else 3.0,
        "motion_max": None if is_image else 5.0, "overlay_score": 0.0, "overlay_box": None,
        "watermark_prob": 0.05, "watermark_max": 0.1, "aesthetic_mean": aesthetic, "aesthetic_min": aesthetic - 0.5,
        "caption": caption, "caption_model": "test", "caption_tokens": 4, "caption_latency_s": 0.1,
        "caption_similarity": 0.3, "models": {}, "stage_versions": {}, "reject_reasons": [], "run_id": video["run_id"],
    }


def make_library(root: Path, run_id: str = "run-shards-test") -> tuple[list[dict], list[dict]]:
    """Five sources (landscape, portrait, 3:1 wide, too small, square image) and their clip rows.

    Scores pass the catalog's default thresholds except land.mp4's first clip (aesthetic 4.0 < 4.5).

    Returns (video rows, clip rows); ``video_uri`` is not added (the catalog join adds it).
    """
    specs = [
        ("land.mp4", 320, 192, 12, 50, [(0, 25), (25, 50)]),    # two 17-frame clips of one video
        ("portrait.mp4", 192, 320, 30, 60, [(0, 60)]),          # 2 s: 16 frames at 8 fps, so the 9 bucket
        ("wide.mp4", 432, 144, 24, 48, [(0, 48)]),               # 3:1, 9 frames
        ("tiny.mp4", 64, 64, 24, 48, [(0, 48)]),                 # too small for any bucket
    ]
    videos, clips = [], []
    for i, (name, w, h, fps, n, spans) in enumerate(specs):
        path = make_video(root / name, w, h, fps, n)
        v = video_row(path, run_id, width=w, height=h, fps=float(fps), frames=n)
        videos.append(v)
        for k, (s, e) in enumerate(spans):
            clips.append(clip_row(v, s, e, aesthetic=4.0 + i + k, caption=f"{name} clip {k}: a grey disc"))
    img = make_image(root / "square.jpg", 400, 400)
    v = video_row(img, run_id, width=400, height=400, fps=None, frames=1, is_image=True)
    videos.append(v)
    clips.append(clip_row(v, 0, 1, aesthetic=7.0, caption="a still grey disc"))
    return videos, clips


def write_run(out: Path, videos: list[dict], clips: list[dict], run_id: str = "run-shards-test") -> Path:
    import json
    from datetime import UTC, datetime

    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    now = datetime(2026, 11, 1, tzinfo=UTC)
    runs = [{"run_id": run_id, "started_at": now, "finished_at": now, "wall_seconds": 1.0, "input": str(out),
             "output": str(out), "config": "{}", "package_versions": "{}", "counts": json.dumps({}),
             "standin_models": True}]
    for name, rows in (("videos", videos), ("clips", clips), ("rejects", []), ("runs", runs)):
        pq.write_table(schema.to_table(name, rows), out / f"{name}.parquet")
    return out
