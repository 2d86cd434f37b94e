"""Training batches from bucketed WebDataset shards.

Shard layout (``catalog.shards``, the format the curation pipeline writes): ``ROOT/<F>x<H>x<W>/shard-NNNNNN.tar``
with keys ``mp4`` (H.264, exactly F frames of HxW) or ``jpg`` (an image, F = 1), ``txt`` and ``json``.

Batching is one bucket per batch (the default collation needs equal shapes). Which bucket a step
draws from is a pure function of (seed, step), so every data-parallel rank picks the same bucket
on the same step. Each bucket is an endless stream (epoch after epoch, shard order reshuffled per
epoch from the seed) split across ranks sample by sample. The data position is the number of
batches each bucket has given, which is all a resume needs: the stream is rebuilt and skips that
many samples before decoding anything.
"""
from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import webdataset as wds

from catalog.shards import bucket_shards, decode_pixels, parse_bucket


@dataclass(frozen=True, kw_only=True, slots=True)
class DataConfig:
    root: str = ""
    """Folder holding one sub-folder of tars per bucket (``<F>x<H>x<W>``)."""
    buckets: tuple[str, ...] = ()
    """Buckets to train on, e.g. ["17x256x256", "1x256x256"]."""
    weights: tuple[float, ...] = ()
    """Relative probability of drawing each bucket on a step (same length as buckets)."""
    batch_sizes: tuple[int, ...] = ()
    """Per-rank batch size for each bucket (same length as buckets)."""
    shardshuffle: bool = True
    """Reshuffle the shard order every epoch (from the seed, so it is reproducible)."""
    heldout_root: str = ""
    """Folder with held-out shards in the same layout; empty disables held-out PSNR."""
    heldout_bucket: str = ""
    """Bucket of the held-out shards to evaluate on."""
    heldout_samples: int = 4
    """How many held-out samples to evaluate (split across ranks)."""

    def __post_init__(self) -> None:
        if not (len(self.buckets) == len(self.weights) == len(self.batch_sizes)):
            raise ValueError(
                "DataConfig: buckets, weights and batch_sizes must have the same length, got "
                f"{len(self.buckets)}, {len(self.weights)}, {len(self.batch_sizes)}"
            )
        for b in self.buckets:
            parse_bucket(b)
        if any(w < 0 for w in self.weights) or (self.weights and sum(self.weights) <= 0):
            raise ValueError(f"DataConfig.weights: expected non-negative with a positive sum, got {self.weights}")
        if any(n < 1 for n in self.batch_sizes):
            raise ValueError(f"DataConfig.batch_sizes: expected >= 1 each, got {self.batch_sizes}")
        if self.heldout_root and not self.heldout_bucket:
            raise ValueError("DataConfig: heldout_root is set but heldout_bucket is empty")


# ---------------------------------------------------------------------------------------------
# Decoding one sample
# ---------------------------------------------------------------------------------------------


def to_tensor(frames: np.ndarray) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (3, T, H, W) float32 in [-1, 1]."""
    x = torch.from_numpy(frames).permute(3, 0, 1, 2).float()
    return x / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(3, T, H, W) in [-1, 1] -> (T, H, W, 3) uint8."""
    y = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return y.permute(1, 2, 3, 0).cpu().numpy()


def decode_sample(sample: dict[str, Any], bucket: str) -> torch.Tensor:
    """A raw WebDataset sample -> (3, F, H, W); raises if it does not have the bucket's shape."""
    frames = decode_pixels(sample)  # (F, H, W, 3)
    expected = parse_bucket(bucket)
    if frames.shape[:3] != expected:
        raise ValueError(
            f"sample {sample.get('__key__')} in {sample.get('__url__')}: expected {expected} (F, H, W) "
            f"for bucket {bucket}, got {frames.shape[:3]}"
        )
    return to_tensor(frames)


# ---------------------------------------------------------------------------------------------
# Streams
# ---------------------------------------------------------------------------------------------


def _endless_shards(urls: list[str], seed: int, shuffle: bool):
    def source() -> Iterator[dict[str, str]]:
        for epoch in itertools.count():
            order = list(urls)
            if shuffle:
                random.Random(f"{seed}:{epoch}").shuffle(order)
            yield from ({"url": u} for u in order)

    return source


def _take_rank(rank: int, world_size: int):
    # Split by sample, not by shard: a bucket with fewer shards than ranks still feeds every rank.
    def stage(src: Iterator[dict]) -> Iterator[dict]:
        for i, sample in enumerate(src):
            if i % world_size == rank:
                yield sample

    return stage


def _skip(n: int):
    def stage(src: Iterator[dict]) -> Iterator[dict]:
        return itertools.islice(src, n, None)

    return stage


def _collate(samples: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(samples)  # (B, 3, F, H, W)


def bucket_pipeline(
    urls: list[str], bucket: str, *, batch_size: int, seed: int, shardshuffle: bool,
    rank: int = 0, world_size: int = 1, skip_samples: int = 0,
) -> wds.DataPipeline:
    """Endless batches (B, 3, F, H, W) of one bucket for one rank, after skipping ``skip_samples``."""
    return wds.DataPipeline(
        _endless_shards(urls, seed, shardshuffle),
        wds.tarfile_to_samples(handler=wds.reraise_exception),
        _take_rank(rank, world_size),
        _skip(skip_samples),
        wds.map(lambda s: decode_sample(s, bucket)),
        wds.batched(batch_size, collation_fn=_collate, partial=False),
    )


def bucket_for_step(seed: int, step: int, weights: tuple[float, ...]) -> int:
    """Index of the bucket that step ``step`` draws from; the same on every rank."""
    return random.Random(f"bucket:{seed}:{step}").choices(range(len(weights)), weights=weights)[0]


class BucketBatches:
    """Batches for successive steps, mixing buckets by weight; ``position`` is resumable state."""

    def __init__(self, cfg: DataConfig, *, seed: int, rank: int, world_size: int,
                 position: dict[str, int] | None = None) -> None:
        if not cfg.buckets:
            raise ValueError("DataConfig.buckets is empty: nothing to train on")
        self.cfg = cfg
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.position = {b: 0 for b in cfg.buckets} | dict(position or {})
        self._streams: dict[str, Iterator[torch.Tensor]] = {}

    def _stream(self, i: int) -> Iterator[torch.Tensor]:
        bucket = self.cfg.buckets[i]
        if bucket not in self._streams:
            bs = self.cfg.batch_sizes[i]
            pipe = bucket_pipeline(
                bucket_shards(self.cfg.root, bucket), bucket, batch_size=bs, seed=self.seed + i,
                shardshuffle=self.cfg.shardshuffle, rank=self.rank, world_size=self.world_size,
                skip_samples=self.position[bucket] * bs,
            )
            self._streams[bucket] = iter(pipe)
        return self._streams[bucket]

    def batch(self, step: int) -> tuple[str, torch.Tensor]:
        """(bucket, (B, 3, F, H, W)) for ``step``."""
        i = bucket_for_step(self.seed, step, self.cfg.weights)
        bucket = self.cfg.buckets[i]
        x = next(self._stream(i))
        self.position[bucket] += 1
        return bucket, x


def heldout_clips(cfg: DataConfig, *, rank: int, world_size: int) -> list[torch.Tensor]:
    """This rank's share of the first ``heldout_samples`` held-out samples, each (3, F, H, W)."""
    if not cfg.heldout_root:
        return []
    urls = bucket_shards(cfg.heldout_root, cfg.heldout_bucket)
    pipe = wds.DataPipeline(
        wds.SimpleShardList(urls),
        wds.tarfile_to_samples(handler=wds.reraise_exception),
        wds.map(lambda s: decode_sample(s, cfg.heldout_bucket)),
    )
    clips = list(itertools.islice(pipe, cfg.heldout_samples))
    return clips[rank::world_size]
