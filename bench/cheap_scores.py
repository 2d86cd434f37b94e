"""Cost of scene cut and the cheap scores next to plain decoding, per decoded frame.

    python bench/cheap_scores.py [VIDEO ...]     # default: the built-in sample, plus ../shared/media if present

Prints, per video, CPU milliseconds (process time, all threads) per decoded frame for decoding (PyAV/decord via pipeline.media at 384 px),
scene cut (every frame), sharpness and static overlay (frames kept at 4 fps), motion (2 fps), and the
ratio (decode) / (decode + all of them): the throughput the CPU stage keeps relative to decoding alone.
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline import media
from pipeline.sample import generate_sample
from pipeline.scenecut import SceneCutConfig, CutDetector, clip_spans
from pipeline.scoring.motion import motion
from pipeline.scoring.overlay import static_overlay
from pipeline.scoring.sharpness import sharpness

MEDIA = Path(__file__).resolve().parents[1] / ".." / "shared" / "media"


def bench(path: Path) -> dict[str, float]:
    info = media.probe(path)
    t = time.process_time()
    frames = [f for _, f in media.open_frames(path, info, max_side=384)]
    decode = time.process_time() - t
    n, fps = len(frames), info.fps
    cfg = SceneCutConfig()
    t = time.process_time()
    det = CutDetector(cfg, fps)
    for i, f in enumerate(frames):
        det.push(i, f)
    cuts = det.finish()
    cut = time.process_time() - t
    arr = np.stack(frames)
    spans = clip_spans(cuts, n, fps, cfg) or [(0, n)]
    costs = {"sharpness": 0.0, "overlay": 0.0, "motion": 0.0}
    for s, e in spans:
        i4 = np.arange(s, e, max(1, round(fps / 4)))
        i2 = np.arange(s, e, max(1, round(fps / 2)))
        t = time.process_time(); sharpness(arr[i4]); costs["sharpness"] += time.process_time() - t
        t = time.process_time(); static_overlay(arr[i4]); costs["overlay"] += time.process_time() - t
        t = time.process_time(); motion(arr[i2], i2 / fps); costs["motion"] += time.process_time() - t
    total = cut + sum(costs.values())
    row = {"frames": n, "decode": decode / n * 1e3, "scenecut": cut / n * 1e3}
    row.update({k: v / n * 1e3 for k, v in costs.items()})
    row["ratio"] = decode / (decode + total)
    return row


def main(argv: list[str]) -> None:
    paths = [Path(p) for p in argv]
    if not paths:
        out = Path(tempfile.mkdtemp(prefix="sample_"))
        paths = [out / it.file for it in generate_sample(out).items if it.fps is not None]
        if MEDIA.is_dir():
            paths += sorted(p for p in MEDIA.iterdir() if p.suffix in (".mp4", ".webm", ".mkv"))
    print(f"{'video':36s} {'frames':>6s}  ms/frame: {'decode':>6s} {'cut':>6s} {'sharp':>6s} {'overlay':>7s} {'motion':>6s}   decode/(decode+scores)")
    for p in paths:
        r = bench(p)
        print(f"{p.name:36s} {r['frames']:6d}            {r['decode']:6.2f} {r['scenecut']:6.2f} {r['sharpness']:6.2f} "
              f"{r['overlay']:7.2f} {r['motion']:6.2f}   {r['ratio']:.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
