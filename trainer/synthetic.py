"""Synthetic clips written as bucketed WebDataset shards, for smoke runs and tests of the trainer.

Written in the one shard format (``catalog.shards``: layout, keys, tar writer, encoder, manifest), the
same the curation pipeline writes, so a trainer config can be tried before any real data is curated.
Clips are smooth coloured blobs drifting over a gradient: learnable by a tiny VAE in a few hundred
CPU steps, and different for every seed.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from catalog.shards import (
    IMAGE_KEY,
    VIDEO_KEY,
    Bucket,
    BucketTarWriter,
    ShardInfo,
    encode_h264,
    encode_jpg,
    make_manifest,
    parse_bucket,
    sample_files,
    write_manifest,
)


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
    """(T, H, W, 3) uint8 -> H.264 mp4 bytes, byte-identical run to run (``catalog.shards.encode_h264``)."""
    return encode_h264(frames, fps, options={"crf": "12"})


def synthetic_files(seed: int, bucket: str, fps: int = 8) -> dict[str, bytes]:
    """The members of the synthetic sample for ``seed`` in ``bucket``."""
    frames, height, width = parse_bucket(bucket)
    clip = synthetic_clip(seed, frames, height, width)  # (F, H, W, 3)
    if frames == 1:
        ext, media = IMAGE_KEY, encode_jpg(clip[0], quality=95)
    else:
        ext, media = VIDEO_KEY, encode_mp4(clip, fps)
    meta = {
        "clip_id": f"synthetic{seed:08d}", "video_id": f"synthetic{seed}",
        "span": {"start_frame": 0, "end_frame": frames, "start_s": 0.0, "end_s": frames / fps},
        "fps": 0.0 if frames == 1 else float(fps), "frames": frames, "bucket": bucket, "scores": {},
    }
    return sample_files(ext, media, f"synthetic blobs, seed {seed}", meta)


def write_bucket(root: str | Path, bucket: str, seeds: list[int], per_shard: int = 4, fps: int = 8) -> list[ShardInfo]:
    """One synthetic sample per seed into ``root/bucket/shard-NNNNNN.tar`` (``per_shard`` each)."""
    writer = BucketTarWriter(root, bucket, maxcount=per_shard, maxsize=2**62)
    try:
        for seed in seeds:
            writer.write(f"synthetic{seed:08d}", synthetic_files(seed, bucket, fps))
    except BaseException:
        writer.abort()
        raise
    return writer.close()


def write_synthetic_shards(root: str | Path, buckets: dict[str, list[int]], per_shard: int = 4, fps: int = 8) -> Path:
    """Shards for every ``bucket -> seeds`` entry plus ``manifest.json``; returns ``root``."""
    root = Path(root)
    infos, shapes = [], {}
    for bucket, seeds in buckets.items():
        f, h, w = parse_bucket(bucket)
        shapes[bucket] = Bucket(f, h, w, 0.0 if f == 1 else float(fps))
        infos += write_bucket(root, bucket, seeds, per_shard, fps)
    write_manifest(root, make_manifest(infos, shapes, source="synthetic"))
    return root
