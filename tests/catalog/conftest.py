"""Fixtures for catalog tests: curation output folders written with catalog.schema, as jobs.curate writes them."""
from __future__ import annotations

import hashlib
import json
import types
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from catalog import schema

MEDIA = Path(__file__).resolve().parents[2] / ".." / "shared" / "media"


def video_id_for(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()[:16]


def video_row(vid: str, run_id: str, *, uri: str, width: int = 640, height: int = 360, fps: float = 25.0,
              frames: int = 250, is_image: bool = False, num_clips: int = 1) -> dict:
    return {
        "video_id": vid, "uri": uri, "bytes": 1_234_567, "container": "image/jpeg" if is_image else "mp4",
        "codec": "mjpeg" if is_image else "h264", "width": width, "height": height, "rotation": 0,
        "sample_aspect": 1.0, "display_width": width, "display_height": height,
        "display_aspect": width / height, "fps": None if is_image else fps, "fps_variable": False,
        "frames": 1 if is_image else frames, "duration": None if is_image else frames / fps,
        "has_audio": False, "is_image": is_image, "decoder": "pillow" if is_image else "pyav",
        "probe_seconds": 0.012, "cut_frames": [] if is_image else [0], "cut_detector": "adaptive(3.0)",
        "num_clips": num_clips, "run_id": run_id,
    }


def clip_row(vid: str, run_id: str, *, start: int = 0, end: int = 100, fps: float = 25.0, width: int = 640,
             height: int = 360, is_image: bool = False, aesthetic: float | None = 5.2,
             watermark: float | None = 0.1, motion: float | None = 12.0, sharpness: float | None = 0.6,
             overlay: float | None = 0.05, similarity: float | None = 0.3, caption: str | None = "a dog runs",
             reasons: tuple[str, ...] = ()) -> dict:
    frames = 1 if is_image else end - start
    return {
        "clip_id": f"{vid}:{start}-{end}", "video_id": vid, "start_frame": start, "end_frame": end,
        "start_s": 0.0 if is_image else start / fps, "end_s": 0.0 if is_image else end / fps,
        "frames": frames, "duration": 0.0 if is_image else frames / fps, "fps": None if is_image else fps,
        "width": width, "height": height, "is_image": is_image,
        "sharpness_min": None if sharpness is None else sharpness * 0.8, "sharpness_median": sharpness,
        "sharpness_low": None if sharpness is None else sharpness * 0.9,
        "motion_mean": None if is_image else motion,
        "motion_max": None if (is_image or motion is None) else motion * 1.5,
        "overlay_score": None if is_image else overlay, "overlay_box": None,
        "watermark_prob": watermark, "watermark_max": None if watermark is None else min(1.0, watermark * 1.3),
        "aesthetic_mean": aesthetic, "aesthetic_min": None if aesthetic is None else aesthetic - 0.4,
        "caption": caption, "caption_model": None if caption is None else "standin:qwen2-vl-tiny",
        "caption_tokens": None if caption is None else len(caption.split()),
        "caption_latency_s": None if caption is None else 0.4, "caption_similarity": similarity,
        "models": {"aesthetic": "standin:laion-aesthetic"}, "stage_versions": {"score": "1"},
        "reject_reasons": list(reasons), "run_id": run_id,
    }


def run_row(run_id: str, started: datetime, *, input_dir: str = "/data/raw", output: str = "/data/out",
            counts: dict | None = None, standin_models: bool = False) -> dict:
    return {
        "run_id": run_id, "started_at": started, "finished_at": started + timedelta(seconds=42),
        "wall_seconds": 42.0, "input": input_dir, "output": output, "config": json.dumps({"scenecut": {}}),
        "package_versions": json.dumps({"duckdb": "1.5"}), "counts": json.dumps(counts or {"inputs": 3}),
        "standin_models": standin_models,
    }


def write_run_folder(out: Path, *, videos: list[dict], clips: list[dict], rejects: list[dict],
                     runs: list[dict]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("videos", videos), ("clips", clips), ("rejects", rejects), ("runs", runs)):
        pq.write_table(schema.to_table(name, rows), out / f"{name}.parquet")
    return out


T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def two_runs(tmp_path: Path) -> dict:
    """Run A curates videos a, b and an image; run B (a day later) re-curates b and adds c.

    Run B's b has one clip where run A had two, so superseding is visible in counts.
    """
    a, b, c, img = (video_id_for(n) for n in ("a.mp4", "b.mp4", "c.mp4", "photo.jpg"))
    run_a = "runA0000000000001"
    run_b = "runB0000000000002"
    folder_a = write_run_folder(
        tmp_path / "outA",
        videos=[video_row(a, run_a, uri="/raw/a.mp4", num_clips=2), video_row(b, run_a, uri="/raw/b.mp4", num_clips=2),
                video_row(img, run_a, uri="/raw/photo.jpg", is_image=True, width=1721, height=1721)],
        clips=[clip_row(a, run_a, start=0, end=100), clip_row(a, run_a, start=100, end=200, aesthetic=3.9),
               clip_row(b, run_a, start=0, end=75), clip_row(b, run_a, start=75, end=150),
               clip_row(img, run_a, start=0, end=1, is_image=True, width=1721, height=1721)],
        rejects=[{"uri": "/raw/broken.mp4", "video_id": None, "stage": "probe", "error_class": "InvalidDataError",
                  "message": "expected a video container, got 0 bytes", "run_id": run_a}],
        runs=[run_row(run_a, T0)],
    )
    folder_b = write_run_folder(
        tmp_path / "outB",
        videos=[video_row(b, run_b, uri="/raw/b.mp4"), video_row(c, run_b, uri="/raw/c.mp4")],
        clips=[clip_row(b, run_b, start=0, end=150, aesthetic=6.1),
               clip_row(c, run_b, start=0, end=30, motion=0.2, aesthetic=None, watermark=None, caption=None,
                        similarity=None, reasons=("too_static",))],
        rejects=[],
        runs=[run_row(run_b, T0 + timedelta(days=1))],
    )
    return {"folders": (folder_a, folder_b), "runs": (run_a, run_b), "ids": {"a": a, "b": b, "c": c, "img": img}}


@pytest.fixture
def registered(tmp_path: Path, two_runs: dict) -> Path:
    from catalog.db import register_run

    db = tmp_path / "catalog.duckdb"
    for folder in two_runs["folders"]:
        register_run(db, folder)
    return db


@pytest.fixture
def rows() -> types.SimpleNamespace:
    """The row builders, for tests that write their own run folders."""
    return types.SimpleNamespace(video_id_for=video_id_for, video_row=video_row, clip_row=clip_row, run_row=run_row,
                                 write_run_folder=write_run_folder, T0=T0)
