"""Synthetic clips written as bucketed WebDataset shards, for smoke runs and tests of the trainer.

Same layout and keys as the curation pipeline's shards (``ROOT/<F>x<H>x<W>/shard-NNNNNN.tar`` with
``mp4`` or ``jpg``, ``txt``, ``json``; ``manifest.json`` at the root), so a trainer config can be tried
before any real data is curated. Clips are smooth coloured blobs drifting over a gradient: learnable
by a tiny VAE in a few hundred CPU steps, and different for every seed.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.sample import encode_h264
from trainer.data import parse_bucket


def synthetic_clip(seed: int, frames: int, height: int, width: int, blobs: int = 3) -> np.ndarray:
    """(frames, height, width, 3) uint8: ``blobs`` Gaussian blobs moving linearly over a colour gradient."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    yy, xx = yy / height, xx / width
    base = rng.uniform(0.1, 0.6, 3).astype(np.float32)
    grad = rng.uniform(-0.3, 0.3, (2, 3)).astype(np.float32)
    background = base + yy[..., None] * grad[0] + xx[..., None] * grad[1]  # (H, W, 3)
    pos = rng.uniform(0.2, 0.8, (blobs, 2)).astype(np.float32)
    vel = rng.uniform(-0.02, 0.02, (blobs, 2)).astype(np.float32)
    radius = rng.uniform(0.08, 0.2, blobs).astype(np.float32)
    color = rng.uniform(0.0, 1.0, (blobs, 3)).astype(np.float32)
    out = np.empty((frames, height, width, 3), np.float32)
    for t in range(frames):
        img = background.copy()
        for b in range(blobs):
            cy, cx = pos[b] + vel[b] * t
            a = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius[b] ** 2))[..., None]
            img = img * (1 - a) + color[b] * a
        out[t] = img
    return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)


def encode_mp4(frames: np.ndarray, fps: int = 8) -> bytes:
    """(T, H, W, 3) uint8 -> H.264 mp4 bytes, byte-identical run to run (see pipeline.sample.encode_h264)."""
    return encode_h264(list(frames), fps, options={"crf": "12"})


def encode_jpg(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def write_bucket(root: str | Path, bucket: str, seeds: list[int], per_shard: int = 4, fps: int = 8) -> list[Path]:
    """One synthetic sample per seed into ``root/bucket/shard-NNNNNN.tar``; returns the tar paths."""
    frames, height, width = parse_bucket(bucket)
    folder = Path(root) / bucket
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(0, len(seeds), per_shard):
        path = folder / f"shard-{s // per_shard:06d}.tar"
        tmp = path.with_suffix(".tar.tmp")
        with tarfile.open(tmp, "w") as tar:
            for seed in seeds[s : s + per_shard]:
                clip = synthetic_clip(seed, frames, height, width)
                key = f"synthetic{seed:08d}"
                if frames == 1:
                    _add(tar, f"{key}.jpg", encode_jpg(clip[0]))
                else:
                    _add(tar, f"{key}.mp4", encode_mp4(clip, fps))
                _add(tar, f"{key}.txt", f"synthetic blobs, seed {seed}".encode())
                meta = {"clip_id": key, "video_id": f"synthetic{seed}", "span": [0, frames], "fps": fps,
                        "scores": {}, "bucket": bucket}
                _add(tar, f"{key}.json", json.dumps(meta).encode())
        os.replace(tmp, path)
        paths.append(path)
    return paths


def write_synthetic_shards(root: str | Path, buckets: dict[str, list[int]], per_shard: int = 4) -> Path:
    """Shards for every ``bucket -> seeds`` entry plus ``manifest.json``; returns ``root``."""
    root = Path(root)
    manifest = {"buckets": {}}
    for bucket, seeds in buckets.items():
        paths = write_bucket(root, bucket, seeds, per_shard)
        manifest["buckets"][bucket] = {"shards": [str(p.relative_to(root)) for p in paths], "samples": len(seeds)}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return root
