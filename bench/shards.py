"""Shard write and read-back speed.

    python bench/shards.py [--clips 24] [--preset medium]

1. Write: clips -> bucketed tars through ``build_shards`` in this one process (per-core rate;
   the Ray job runs one such encoder per task CPU).
2. Read back: every sample read from the tars with plain ``webdataset`` and its mp4 decoded
   with PyAV, against the baseline of decoding the very same mp4 bytes from one file per sample.

Sources: real footage from ../shared/media when present (6 s spans of its long clips, so the
samples are realistic 49-frame 8 fps bucket videos), else generated moving texture.
Last line: ``read_ratio_vs_disk=Y`` (tar samples/s over disk-file samples/s; 1.0 = no cost).
"""
from __future__ import annotations

import argparse
import io
import shutil
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import webdataset as wds

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.buckets import BucketConfig  # noqa: E402
from pipeline.shards import ShardConfig, build_shards  # noqa: E402

MEDIA = REPO.parent / "shared" / "media"
LONG_CLIPS = ("one-by-one-person-detection.mp4", "bottle-detection.mp4", "car-detection.mp4", "friday.mp4")
SPAN_S = 6.2  # 49 frames at 8 fps need 6 s


def _probe(path: Path) -> tuple[int, int, float, int]:
    from pipeline import media

    info = media.probe(path)
    return info.display_width, info.display_height, info.fps, info.frames


def _texture_video(path: Path, seconds: float, fps: int = 24, size: tuple[int, int] = (640, 360)) -> Path:
    """Drifting noise texture: compresses like footage, not like a flat test card."""
    rng = np.random.default_rng(0)
    w, h = size
    base = rng.integers(0, 255, (h * 2, w * 2, 3), dtype=np.uint8)
    with av.open(str(path), "w") as out:
        s = out.add_stream("libx264", rate=Fraction(fps))
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.codec_context.thread_count = 1
        for i in range(int(seconds * fps)):
            frame = np.ascontiguousarray(base[i % h : i % h + h, (2 * i) % w : (2 * i) % w + w])
            out.mux(s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(s.encode())
    return path


def source_rows(n: int, work: Path) -> tuple[list[dict], str]:
    sources = [MEDIA / name for name in LONG_CLIPS if (MEDIA / name).is_file()]
    label = "real footage (../shared/media)"
    if not sources:
        sources, label = [_texture_video(work / "texture.mp4", SPAN_S * n / 2 + 1)], "generated texture"
    spans = []
    for path in sources:
        w, h, fps, frames = _probe(path)
        step = int(SPAN_S * fps) + 1
        spans += [(path, w, h, fps, s, s + step) for s in range(0, frames - step + 1, step)]
    spans = spans[:: max(1, len(spans) // n)][:n]
    rows = []
    for path, w, h, fps, start, end in spans:
        rows.append({
            "clip_id": f"{path.stem}:{start}-{end}", "video_id": path.stem, "video_uri": str(path),
            "start_frame": start, "end_frame": end, "start_s": start / fps, "end_s": end / fps,
            "frames": end - start, "fps": fps, "width": w, "height": h, "is_image": False,
            "caption": f"{path.stem} from {start}", "caption_model": "bench",
        })
    return rows, label


def _decode(source) -> int:
    """Decode every frame to RGB, as a training loader would; both paths use exactly this."""
    with av.open(source) as c:
        return sum(f.to_ndarray(format="rgb24").shape[0] > 0 for f in c.decode(video=0))


def read_tars(urls: list[str]) -> tuple[int, int]:
    n = frames = 0
    for sample in wds.WebDataset(urls, shardshuffle=False):
        frames += _decode(io.BytesIO(sample["mp4"]))
        n += 1
    return n, frames


def read_files(paths: list[Path]) -> tuple[int, int]:
    n = frames = 0
    for p in paths:
        frames += _decode(str(p))
        n += 1
    return n, frames


def best_rate(fn, arg, repeats: int) -> tuple[float, int]:
    best, count = float("inf"), 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        count, _ = fn(arg)
        best = min(best, time.perf_counter() - t0)
    return count / best, count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=24)
    ap.add_argument("--preset", default="medium", help="x264 preset for the shard encode (config default: medium)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_shards_"))
    try:
        rows, label = source_rows(args.clips, work)
        buckets = BucketConfig(frames=(1, 17, 49))
        cfg = ShardConfig(preset=args.preset, maxcount=8)
        t0 = time.perf_counter()
        result = build_shards(rows, work / "shards", where="bench", buckets=buckets, shards=cfg)
        write_s = time.perf_counter() - t0
        m = result.manifest
        print(f"source: {label}; {len(rows)} clips -> {m['samples']} samples in {m['shards']} tars, "
              f"buckets {sorted(m['buckets'])}, errors {len(m['errors'])}, skipped {len(m['skipped'])}")
        print(f"write: {m['samples'] / write_s:.2f} clips/s in one process (decode span + resample + crop/resize"
              f" + x264 {args.preset} + verify), {write_s:.1f} s")

        urls = sorted(str(p) for p in (work / "shards").glob("*/shard-*.tar"))
        loose = work / "loose"
        loose.mkdir()
        paths = []
        for sample in wds.WebDataset(urls, shardshuffle=False):
            p = loose / f"{sample['__key__']}.mp4"
            p.write_bytes(sample["mp4"])
            paths.append(p)
        tar_rate, n_tar = best_rate(read_tars, urls, args.repeats)
        disk_rate, n_disk = best_rate(read_files, paths, args.repeats)
        assert n_tar == n_disk == m["samples"], (n_tar, n_disk, m["samples"])
        mb = sum(p.stat().st_size for p in paths) / 1e6
        print(f"read: webdataset tars + PyAV decode {tar_rate:.1f} samples/s; same mp4s as {len(paths)} files"
              f" {disk_rate:.1f} samples/s ({mb:.1f} MB, best of {args.repeats})")
        print(f"write_clips_per_s={m['samples'] / write_s:.3f}")
        print(f"read_ratio_vs_disk={tar_rate / disk_rate:.3f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
