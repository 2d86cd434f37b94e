"""Frames/s of ``open_frames`` against a plain sequential full-resolution decode of the same file.

    python bench/media_decode.py [VIDEO ...] [--max-side 384] [--reps 3]

Default VIDEOs: ../shared/media/bottle-detection.mp4 (640x360 H.264, static camera: very
compressible) and a generated 10 s 640x360 H.264 clip with moving texture and grain (a realistic
bitrate, written to a temporary folder). Each variant runs ``--reps``
times interleaved with the others and keeps its best run, since other work on the machine only
ever slows a run down. Prints frames/s and the ratio to the baseline (plain PyAV decode to RGB).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import av
import numpy as np

from catalog.shards import encode_h264
from pipeline.media import open_frames, probe

DEFAULT = Path(__file__).resolve().parents[1] / ".." / "shared" / "media" / "bottle-detection.mp4"


def grainy_clip(path: Path, seconds: int = 10, w: int = 640, h: int = 360, fps: int = 30) -> Path:
    """Panning gratings plus per-frame noise: about the bitrate of real 360p footage."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    frames = []
    for i in range(seconds * fps):
        base = 128 + 50 * np.sin((xx + 3 * i) * 0.07) * np.cos((yy - i) * 0.05)
        img = base[..., None] + rng.normal(0, 6, (h, w, 3))
        img[..., 1] *= 0.8
        frames.append(np.clip(img, 0, 255).astype(np.uint8))
    path.write_bytes(encode_h264(frames, fps, options={"crf": "20", "preset": "veryfast"}))
    return path


def plain_pyav(path: Path) -> int:
    """What a user writes first: decode every frame and convert it to RGB at full size."""
    n = 0
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            frame.to_ndarray(format="rgb24")
            n += 1
    return n


def plain_decord(path: Path) -> int:
    import decord

    reader = decord.VideoReader(str(path))
    n = 0
    for start in range(0, len(reader), 32):
        n += len(reader.get_batch(list(range(start, min(len(reader), start + 32)))).asnumpy())
    return n


def bench(video: Path, max_side: int, reps: int) -> None:
    info = probe(video)
    variants = {
        "plain PyAV full-res (baseline)": lambda: plain_pyav(video),
        "plain decord full-res": lambda: plain_decord(video),
        f"open_frames auto max_side={max_side}": lambda: sum(1 for _ in open_frames(video, info, max_side=max_side)),
        f"open_frames pyav max_side={max_side}": lambda: sum(
            1 for _ in open_frames(video, info, max_side=max_side, backend="pyav")),
        "open_frames auto full-res": lambda: sum(1 for _ in open_frames(video, info)),
    }
    best: dict[str, float] = {}
    best_cpu: dict[str, float] = {}
    for _ in range(reps):
        for name, fn in variants.items():
            t0, c0 = time.perf_counter(), time.process_time()
            n = fn()
            fps = n / (time.perf_counter() - t0)
            cpu_fps = n / max(time.process_time() - c0, 1e-9)
            if n != info.frames:
                raise SystemExit(f"{name}: expected {info.frames} frames, got {n}")
            best[name] = max(best.get(name, 0.0), fps)
            best_cpu[name] = max(best_cpu.get(name, 0.0), cpu_fps)
    base = best["plain PyAV full-res (baseline)"]
    base_cpu = best_cpu["plain PyAV full-res (baseline)"]
    print(f"{video.name}: {info.width}x{info.height} {info.codec}, {info.frames} frames, "
          f"{info.bytes * 8 / info.duration / 1e6:.2f} Mbit/s, best of {reps}")
    print(f"  {'variant':<40} {'wall frames/s':>14} {'ratio':>6} {'frames/CPU-s':>13} {'ratio':>6}")
    for name, fps in best.items():
        print(f"  {name:<40} {fps:14.0f} {fps / base:5.2f}x {best_cpu[name]:13.0f} {best_cpu[name] / base_cpu:5.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("videos", nargs="*", type=Path)
    parser.add_argument("--max-side", type=int, default=384)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        videos = args.videos or [p for p in (DEFAULT.resolve(),) if p.exists()] + [grainy_clip(Path(tmp) / "grainy.mp4")]
        for video in videos:
            bench(video, args.max_side, args.reps)


if __name__ == "__main__":
    main()
