"""Peak memory of the curation analysis (the CPU stage) on one unbroken shot: 1 minute against 10 minutes.

Generates single-shot clips (a slow pan over a smooth texture, no cut anywhere) at 384x216, 24 fps, and runs the
analysis of each in a fresh process, consuming ``pipeline.analyze.iter_analyze`` as the run does (each clip leaves
as soon as it is scored), then reports that process's peak RSS. The bound: the analysis holds the open scene's
analysis frames, and a scene longer than ``STREAM_SPLIT_CLIPS`` maximum clips is cut into ``max_clip_s`` pieces as
it streams, so the peak does not grow with the shot's length:

    mem_ratio_10min_over_1min = peak RSS (10 min) / peak RSS (1 min)       target <= 1.3

Also a 16000x16000 H.264 file (two frames): above ``[decode] max_pixels`` it is a probe reject before any frame is
decoded; its peak is printed beside the same process's baseline.

    python bench/curate_memory.py [--minutes 1 10] [--keep DIR]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

W, H, FPS = 384, 216, 24

_CHILD = r"""
import json, sys, time
from pipeline.analyze import ClipResult, iter_analyze
from pipeline.scenecut import SceneCutConfig
from pipeline.settings import DecodeConfig, PrefilterConfig
import cv2
cv2.setNumThreads(1)
def hwm_kb():
    # This process's own peak (VmHWM). getrusage's ru_maxrss starts at the parent's peak across fork + exec, so a
    # bench process that generated the 16000x16000 frames passed its 2.6 GB on to every later measurement.
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
base = hwm_kb()
t0 = time.perf_counter()
clips, last = 0, None
for item in iter_analyze(sys.argv[1], DecodeConfig(), SceneCutConfig(), PrefilterConfig()):
    if isinstance(item, ClipResult):
        clips += 1
    else:
        last = item
peak = hwm_kb()
print(json.dumps({"baseline_kb": base, "peak_kb": peak, "clips": clips, "seconds": time.perf_counter() - t0,
                  "reject": last.reject, "frames": None if last.video is None else last.video["frames"]}))
"""


def single_shot(path: Path, minutes: float) -> Path:
    """One unbroken shot: a 1 px/frame pan over a smooth, textured canvas (no cut for the detector to find)."""
    import av
    import cv2
    import numpy as np

    n = int(minutes * 60 * FPS)
    rng = np.random.default_rng(0)
    # A canvas wider than the pan, made of smooth noise (realistic compressibility), tiled if very long.
    tile_w = 4096
    tile = cv2.GaussianBlur(rng.integers(0, 255, (H, tile_w, 3), dtype=np.uint8), (0, 0), 3)
    tile = np.concatenate([tile, tile[:, :W]], axis=1)  # wraps seamlessly
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=FPS, options={"preset": "ultrafast", "x264-params": "scenecut=0"})
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.codec_context.thread_count = 1
        for i in range(n):
            x = i % tile_w
            frame = np.ascontiguousarray(tile[:, x:x + W])
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def huge_frames(path: Path, side: int = 16000, frames: int = 2) -> Path:
    import av
    import numpy as np

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=1, options={"preset": "ultrafast", "rc-lookahead": "0"})
        stream.width = stream.height = side
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1
        for i in range(frames):
            frame = av.VideoFrame(side, side, "yuv420p")
            for plane, value in zip(frame.planes, (60 + 40 * i, 128, 128)):
                np.frombuffer(plane, dtype=np.uint8)[:] = value
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def measure(path: Path) -> dict:
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", _CHILD, str(path)], capture_output=True, text=True, cwd=repo,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, nargs=2, default=(1.0, 10.0), metavar=("SHORT", "LONG"))
    ap.add_argument("--keep", help="write the generated files here (default: a temporary folder)")
    ap.add_argument("--skip-huge", action="store_true", help="leave out the 16000x16000 file")
    args = ap.parse_args()
    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="curate_memory_"))
    folder.mkdir(parents=True, exist_ok=True)
    results = {}
    for minutes in args.minutes:
        path = folder / f"single_shot_{minutes:g}min.mp4"
        t0 = time.perf_counter()
        if not path.exists():
            single_shot(path, minutes)
        gen = time.perf_counter() - t0
        r = measure(path)
        results[minutes] = r
        print(f"single_shot_{minutes:g}min: {path.stat().st_size / 1e6:.1f} MB, {r['frames']} frames, "
              f"{r['clips']} clips, analysis {r['seconds']:.1f}s (generated in {gen:.1f}s), "
              f"baseline_rss_mb={r['baseline_kb'] / 1024:.0f} peak_rss_mb={r['peak_kb'] / 1024:.0f}")
    short, long_ = (results[m] for m in args.minutes)
    print(f"mem_ratio_{args.minutes[1]:g}min_over_{args.minutes[0]:g}min={long_['peak_kb'] / short['peak_kb']:.3f} "
          f"(target <= 1.3)")
    print(f"peak_above_baseline_mb: {args.minutes[0]:g} min {(short['peak_kb'] - short['baseline_kb']) / 1024:.0f}, "
          f"{args.minutes[1]:g} min {(long_['peak_kb'] - long_['baseline_kb']) / 1024:.0f}")
    if not args.skip_huge:
        path = folder / "huge_16000x16000.mp4"
        if not path.exists():
            huge_frames(path)
        r = measure(path)
        verdict = (f"rejected at {r['reject']['stage']}: {r['reject']['error_class']}: {r['reject']['message']}"
                   if r["reject"] else f"analysed: {r['clips']} clips")
        print(f"huge_16000x16000: {path.stat().st_size / 1e3:.0f} KB, {verdict}; baseline_rss_mb="
              f"{r['baseline_kb'] / 1024:.0f} peak_rss_mb={r['peak_kb'] / 1024:.0f}")


if __name__ == "__main__":
    main()
