"""Frames/s of ``open_frames`` against a plain sequential full-resolution decode of the same file.

    python bench/media_decode.py [VIDEO] [--max-side 384] [--reps 3]

Default VIDEO: ../shared/media/bottle-detection.mp4 (640x360 H.264). Each variant runs ``--reps``
times interleaved with the others and keeps its best run, since other work on the machine only
ever slows a run down. Prints frames/s and the ratio to the baseline (plain PyAV decode to RGB).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import av

from pipeline.media import open_frames, probe

DEFAULT = Path(__file__).resolve().parents[1] / ".." / "shared" / "media" / "bottle-detection.mp4"


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("video", nargs="?", type=Path, default=DEFAULT)
    parser.add_argument("--max-side", type=int, default=384)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    info = probe(args.video)
    variants = {
        "plain PyAV full-res (baseline)": lambda: plain_pyav(args.video),
        "plain decord full-res": lambda: plain_decord(args.video),
        f"open_frames auto max_side={args.max_side}": lambda: sum(1 for _ in open_frames(args.video, info, max_side=args.max_side)),
        f"open_frames pyav max_side={args.max_side}": lambda: sum(1 for _ in open_frames(args.video, info, max_side=args.max_side, backend="pyav")),
        "open_frames auto full-res": lambda: sum(1 for _ in open_frames(args.video, info)),
    }
    best: dict[str, float] = {}
    best_cpu: dict[str, float] = {}
    for _ in range(args.reps):
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
    print(f"{args.video.name}: {info.width}x{info.height} {info.codec}, {info.frames} frames, best of {args.reps}")
    print(f"  {'variant':<40} {'wall frames/s':>14} {'ratio':>6} {'frames/CPU-s':>13} {'ratio':>6}")
    for name, fps in best.items():
        print(f"  {name:<40} {fps:14.0f} {fps / base:5.2f}x {best_cpu[name]:13.0f} {best_cpu[name] / base_cpu:5.2f}x")


if __name__ == "__main__":
    main()
