"""Throughput of the curation CPU stages against plain decode and the PySceneDetect command line.

Generates a 30 s 640x360 H.264 clip (moving texture with hard cuts), then times, in this process:
  1. the CPU stages together (probe + one decode + scene cut + sharpness/motion/overlay per clip),
  2. a plain sequential decode of the same file to RGB frames (PyAV, full resolution),
  3. the `scenedetect` command line alone (detect-adaptive, its defaults).
  4. the OCR stage alone (PP-OCRv4 detection, and recognition of the mean frame's corners, its bundled weights, one
     onnxruntime thread as an actor gets), on
     the frames the curation hands it (``[decode] model_fps`` per second at the analysis size), printed
     apart: it runs in its own actor pool, not in the CPU stages above.
The three are timed in rounds, one run of each per round, so a drift of the machine's speed (here the scenedetect
command line alone read 700-910 frames/s at different times of one session) moves all three alike; each ratio is
the median over rounds of that round's ratio, and the frames/s lines are each one's best round.
Last line: ratio_vs_decode=X ratio_vs_scenedetect=Y  (targets: >= 1.0 and >= 1.5).

    python bench/curate_cpu.py [--seconds 30] [--repeat 5]
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np


def make_clip(path: Path, seconds: float, w: int = 640, h: int = 360, fps: int = 30) -> int:
    rng = np.random.default_rng(0)
    n = int(seconds * fps)
    shot_len = 5 * fps
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    with av.open(str(path), "w") as out:
        s = out.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.codec_context.thread_count = 1
        s.options = {"crf": "23", "preset": "veryfast"}
        for i in range(n):
            shot = i // shot_len
            if i % shot_len == 0:
                f1, f2 = rng.uniform(0.01, 0.06, 2)
                col = rng.uniform(60, 200, 3)
                blobs = rng.uniform(0, 1, (6, 3)) * [w, h, 40]
            t = i / fps
            base = 0.5 + 0.25 * np.sin(f1 * (xx + 40 * t * (shot % 3 + 1))) + 0.25 * np.cos(f2 * (yy - 25 * t))
            img = base[..., None] * col[None, None, :]
            for bx, by, br in blobs:
                cx = (bx + 60 * t) % w
                img[(xx - cx) ** 2 + (yy - by) ** 2 < (br + 8) ** 2] = 255 - col
            # Film grain keeps the bitrate near real 360p web video (~1 Mbit/s); a clean synthetic clip
            # compresses 5x smaller and decodes 2-3x faster than anything a curation run will see.
            img = np.clip(img + rng.normal(0, 5, img.shape[:2])[..., None], 0, 255).astype(np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(p)
        for p in s.encode():
            out.mux(p)
    return n


def plain_decode(path: Path) -> int:
    n = 0
    with av.open(str(path)) as c:
        for frame in c.decode(video=0):
            frame.to_ndarray(format="rgb24")
            n += 1
    return n


def cpu_stages(path: Path) -> int:
    from pipeline.analyze import analyze_video
    from pipeline.scenecut import SceneCutConfig
    from pipeline.settings import DecodeConfig, PrefilterConfig

    res = analyze_video(str(path), DecodeConfig(), SceneCutConfig(), PrefilterConfig())
    if res.video is None:
        raise RuntimeError(f"CPU stages rejected the bench clip: {res.reject}")
    return int(res.video["frames"])


def scenedetect_cli(path: Path, workdir: Path) -> None:
    exe = shutil.which("scenedetect")
    cmd = [exe] if exe else [sys.executable, "-m", "scenedetect"]
    subprocess.run(cmd + ["-q", "-i", str(path), "-o", str(workdir), "detect-adaptive", "list-scenes", "-n"],
                   check=True, stdout=subprocess.DEVNULL)


def ocr_frames(path: Path) -> np.ndarray:
    """The frames the OCR stage sees: model_fps per second, at the analysis frames' size."""
    from pipeline.media import open_frames, probe
    from pipeline.settings import DecodeConfig, PrefilterConfig

    info = probe(path)
    every = max(1, round(info.fps / DecodeConfig().model_fps))
    return np.stack([f for i, f in open_frames(path, info, max_side=DecodeConfig().max_side) if i % every == 0])


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def best_of(fn, repeat: int) -> float:
    return min(timed(fn) for _ in range(repeat))


def main() -> None:
    from pipeline.settings import DecodeConfig

    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--repeat", type=int, default=5, help="rounds (one run of each of the three per round)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        clip = Path(tmp) / "bench_640x360.mp4"
        n = make_clip(clip, args.seconds)
        mbit = clip.stat().st_size * 8 / 1e6 / args.seconds
        print(f"clip: {clip.name} {n} frames, {clip.stat().st_size / 1e6:.1f} MB, {mbit:.2f} Mbit/s")
        cpu_stages(clip)  # warm imports and caches outside the timed runs
        rounds = []  # (decode, CPU stages, scenedetect) seconds, one round each
        for _ in range(args.repeat):
            rounds.append((timed(lambda: plain_decode(clip)), timed(lambda: cpu_stages(clip)),
                           timed(lambda: scenedetect_cli(clip, Path(tmp)))))
        from pipeline.models.ocr import TextDetector

        sampled = ocr_frames(clip)
        ocr = TextDetector(threads=1)
        ocr.text_regions(sampled[:2])  # onnxruntime's first run allocates
        t_ocr = best_of(lambda: ocr.text_regions(sampled), args.repeat)
    t_dec, t_cpu, t_sd = (min(r[k] for r in rounds) for k in range(3))
    fps_dec, fps_cpu, fps_sd = n / t_dec, n / t_cpu, n / t_sd
    vs_dec = statistics.median(d / c for d, c, _ in rounds)
    vs_sd = statistics.median(sd / c for _, c, sd in rounds)
    print("rounds (s): " + "  ".join(f"decode {d:.3f} cpu {c:.3f} scenedetect {sd:.3f}" for d, c, sd in rounds))
    print(f"plain decode (PyAV, full res, rgb24): {fps_dec:8.1f} frames/s")
    print(f"CPU stages (decode+cut+scores):      {fps_cpu:8.1f} frames/s")
    print(f"scenedetect CLI (detect-adaptive):   {fps_sd:8.1f} frames/s")
    rate = len(sampled) / t_ocr
    print(f"OCR stage (PP-OCRv4 det+read, 1 thread): {rate:8.1f} frames/s on {len(sampled)} frames "
          f"{sampled.shape[2]}x{sampled.shape[1]} ({ocr.provider}), "
          f"{rate / DecodeConfig().model_fps:.1f} video seconds/s")
    print(f"ratio_vs_decode={vs_dec:.2f} ratio_vs_scenedetect={vs_sd:.2f}")


if __name__ == "__main__":
    main()
