"""Training batches from bucketed WebDataset shards.

Shard layout (``catalog.shards``, the format the curation pipeline writes): ``ROOT/<F>x<H>x<W>/shard-NNNNNN.tar``
with keys ``mp4`` (H.264, exactly F frames of HxW) or ``jpg`` (an image, F = 1), ``txt`` and ``json``.

Batching is one bucket per batch (the default collation needs equal shapes). Which bucket a step
draws from is a pure function of (seed, step), so every data-parallel rank picks the same bucket
on the same step. Each bucket is an endless stream (epoch after epoch, shard order reshuffled per
epoch from the seed) split across ranks sample by sample. The data position is the number of
batches each bucket has given, which is all a resume needs: the stream is rebuilt and skips that
many samples before decoding anything.

Only complete shard folders are read: the shard writers put ``manifest.json`` (every tar's samples, size and
sha256) down after their last tar, so a folder without one, or whose tars are missing or of another size than it
lists, is a job that did not finish; ``dataset_shards`` refuses it naming the missing pieces, before any model is
built, unless ``allow_partial = true`` in ``[data]``. A tar that fails to read while training stops the run with
``ShardReadError`` naming the tar and the reader's own error. A tar that reads to its end with fewer samples than its
manifest lists (Python's tarfile takes a corrupt header in the middle for the end of the archive, without a word)
gives one bad sample per missing one, named with the expected and the actual count.

Bad samples (undecodable, wrong shape, no caption for the DiT, missing from a damaged tar) are skipped and counted
under one budget both loaders share (``BadSampleBudget``: ``[data] max_bad_samples``, ``max_bad_fraction``); the
step metrics carry the counts, and a loader over budget stops with ``BadDataError`` (a ``ShardReadError``) naming
the shard and the sample's own error. The sha256 the manifest lists is not checked when training starts: that
reads every byte of the dataset on every start and rank; the sizes are (a stat per tar), the sample counts as each
tar is read, and a tar that fails either check has its sha256 compared in the error message.
"""
from __future__ import annotations

import itertools
import math
import random
import re
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds

from catalog.shards import (
    LATENT_KEY,
    MANIFEST,
    TEXT_KEY,
    TEXT_MASK_KEY,
    IncompleteShardsError,
    ManifestError,
    bucket_shards,
    complete_shards,
    decode_array,
    decode_pixels,
    encode_array,
    file_sha256,
    missing_pieces,
    parse_bucket,
    read_manifest,
)


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
    allow_partial: bool = False
    """Train on a shard folder without a complete manifest (a killed shard job's tars), with a warning; off, such a
    folder is refused naming what is missing."""
    max_bad_samples: int = 16
    """Bad samples (undecodable, wrong shape, missing from a damaged tar) a rank may skip before it stops; 0 stops at
    the first (``BadSampleBudget``)."""
    max_bad_fraction: float = 0.01
    """Also stop when more than this fraction of the samples read were bad (checked after ``bad_check_after``)."""
    bad_check_after: int = 100
    """Samples to read before the fraction is checked (one bad first sample is not yet a rate)."""
    max_bad_run: int = 64
    """Consecutive bad samples after a window (while filling its batch) that stop the loader at once."""

    def __post_init__(self) -> None:
        check_budget("DataConfig", self)
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
# Complete shard folders only; read errors name the tar
# ---------------------------------------------------------------------------------------------


class PartialDataWarning(UserWarning):
    """Training on an incomplete shard folder because ``allow_partial = true``."""


class ShardReadError(RuntimeError):
    """A tar could not be read (truncated, corrupt, unreadable): the message names it and the reader's error.

    Holds only its message, so it crosses DataLoader workers and Ray Train intact (webdataset's own exception
    carries the open file, which cannot be pickled).
    """


class BadDataError(ShardReadError):
    """More bad samples than the ``[data]`` budget allows: the message names the shard(s) and the samples' errors."""


class BadSampleWarning(UserWarning):
    """A shard sample was skipped (undecodable bytes, wrong shape, no caption, missing from a damaged tar)."""


def check_budget(owner: str, cfg: Any) -> None:
    """The budget fields both data configs carry, checked alike."""
    if cfg.max_bad_samples < 0:
        raise ValueError(f"{owner}.max_bad_samples: expected >= 0 (0 stops at the first bad sample), got "
                         f"{cfg.max_bad_samples}")
    if not 0.0 <= cfg.max_bad_fraction < 1.0:
        raise ValueError(f"{owner}.max_bad_fraction: expected a fraction in [0, 1), got {cfg.max_bad_fraction}")
    if cfg.bad_check_after < 1 or cfg.max_bad_run < 1:
        raise ValueError(f"{owner}: expected bad_check_after >= 1 and max_bad_run >= 1, got "
                         f"{cfg.bad_check_after} and {cfg.max_bad_run}")


class BadSampleBudget:
    """One rank's skipped bad samples against the ``[data]`` budget, the same for the VAE and the DiT loader.

    ``account(read, bad)`` takes each batch's window (samples of the stream it consumed) and its bad samples
    (dicts with ``key``, ``shard``, ``reason``) and raises ``BadDataError`` once more than ``max_bad_samples`` were
    skipped, or more than ``max_bad_fraction`` of at least ``bad_check_after`` samples read. ``state_dict`` goes
    into the checkpoint so a resumed run keeps counting; ``metrics`` are the step metric counters.
    """

    def __init__(self, cfg: Any, state: dict[str, Any] | None = None) -> None:
        state = state or {}
        self.max_bad_samples, self.max_bad_fraction = cfg.max_bad_samples, cfg.max_bad_fraction
        self.bad_check_after = cfg.bad_check_after
        self.samples_read = int(state.get("samples_read", 0))
        self.bad_samples = int(state.get("bad_samples", 0))
        self.bad_by_shard: dict[str, int] = dict(state.get("bad_by_shard", {}))

    def state_dict(self) -> dict[str, Any]:
        return {"samples_read": self.samples_read, "bad_samples": self.bad_samples,
                "bad_by_shard": dict(self.bad_by_shard)}

    def metrics(self) -> dict[str, float]:
        """Counters for the step metrics (this rank's; ``trainer.metrics.data_metrics`` sums them over ranks)."""
        return {"data_samples_read": float(self.samples_read), "data_bad_samples": float(self.bad_samples),
                "data_bad_fraction": self.bad_samples / max(self.samples_read, 1)}

    def account(self, read: int, bad: list[dict[str, str]]) -> None:
        self.samples_read += read
        for b in bad:
            self.bad_samples += 1
            self.bad_by_shard[b["shard"]] = self.bad_by_shard.get(b["shard"], 0) + 1
        if not bad:
            return
        if self.bad_samples > self.max_bad_samples:
            over = (f"{self.bad_samples} bad sample(s) skipped of {self.samples_read} read, over the budget of "
                    f"max_bad_samples {self.max_bad_samples}" + (" (stop at the first)" if not self.max_bad_samples else ""))
        elif (self.samples_read >= self.bad_check_after
              and self.bad_samples > self.max_bad_fraction * self.samples_read):
            over = (f"{self.bad_samples} of {self.samples_read} samples read were bad "
                    f"({self.bad_samples / self.samples_read:.1%} > max_bad_fraction {self.max_bad_fraction:.1%})")
        else:
            return
        worst = sorted(self.bad_by_shard.items(), key=lambda kv: -kv[1])
        last = bad[-1]
        raise BadDataError(f"{over}; last: sample {last['key']} in shard {last['shard']}: {last['reason']}; "
                           f"bad samples by shard: {worst[:10]}")


def dataset_shards(root: str, buckets: Iterable[str], *, allow_partial: bool) -> dict[str, list[str]]:
    """{bucket: tar paths} to read: those ``root``'s complete manifest lists. A folder whose manifest is missing
    or incomplete (``catalog.shards.missing_pieces``: sizes checked) raises ``IncompleteShardsError`` naming every
    missing piece, unless ``allow_partial``: then it warns and reads the complete-named tars on disk."""
    buckets = list(buckets)
    problems = missing_pieces(root, buckets)
    if problems and not allow_partial:
        raise IncompleteShardsError(
            f"shard folder {root} is incomplete: {'; '.join(problems)}. Rebuild it (python -m jobs.shards), or set "
            "allow_partial = true in [data] to train on the tars that are there"
        )
    if problems:
        warnings.warn(f"training on the incomplete shard folder {root} (allow_partial): {'; '.join(problems)}",
                      PartialDataWarning, stacklevel=2)
        return {b: bucket_shards(root, b) for b in buckets}
    return {b: complete_shards(root, b) for b in buckets}


def _listed(url: str) -> dict[str, Any] | None:
    """The manifest entry of a tar path, if its folder's manifest lists it."""
    path = Path(url)
    try:
        manifest = read_manifest(path.parent.parent)
    except ManifestError:
        return None
    entry = (manifest or {}).get("buckets", {}).get(path.parent.name, {})
    rel = f"{path.parent.name}/{path.name}"
    return next((s for s in entry.get("shards", []) if s["shard"] == rel), None)


def _shard_error(exn: BaseException) -> bool:
    """webdataset handler: re-raise a tar's read error as ``ShardReadError`` naming the tar and what its manifest
    says of it (size, sha256)."""
    # webdataset appends (stream, url) to the error's args and names the stream in the message.
    named = [a for a in exn.args[1:] if isinstance(a, str)]
    url = named[-1] if named else None
    if url is None:
        # The member reader's call: webdataset hands the error on to the tar and url level, which names the url.
        raise exn
    first = exn.args[0] if exn.args and isinstance(exn.args[0], str) else str(exn)
    detail = re.sub(r" @ <_io\.\w+ name=.*?>", "", first)
    raise ShardReadError(f"shard {url}{_against_manifest(url)}: {type(exn).__name__}: {detail}") from None


def _against_manifest(url: str) -> str:
    """" (<what the tar's size and sha256 say against its manifest>)" for an error message; reads the tar once."""
    if not Path(url).is_file():
        return ""
    size, entry = Path(url).stat().st_size, _listed(url)
    if entry is None:
        return f" ({size} bytes; not listed in a {MANIFEST})"
    if entry["bytes"] != size:
        return f" ({size} bytes on disk, its manifest says {entry['bytes']}: truncated or rewritten)"
    if file_sha256(url) != entry["sha256"]:
        return f" ({size} bytes as its manifest says, but its sha256 differs: the tar is corrupt)"
    return " (size and sha256 as its manifest says)"


MISSING = "__missing__"
"""Key of the stand-in sample a short tar yields for each sample its manifest lists but the reader did not get;
its value is the reason (loaders count it as a bad sample)."""


def listed_counts(root: str | Path) -> dict[str, int]:
    """{tar path: samples} as ``root``'s manifest lists them (empty without a readable manifest: nothing to check)."""
    try:
        manifest = read_manifest(root)
    except ManifestError:
        return {}
    if manifest is None:
        return {}
    return {str(Path(root) / s["shard"]): int(s["samples"])
            for entry in manifest["buckets"].values() for s in entry["shards"]}


def _samples_of_tars(expected: dict[str, int] | None = None):
    """Samples of each tar in turn (read errors re-raised as ``ShardReadError``), then the tar's count checked
    against ``expected`` ({tar path: samples}, a manifest's): Python's tarfile ends a tar at a corrupt header in
    its middle as if the archive ended there, so a damaged tar would otherwise just train on fewer samples. Each
    missing sample becomes a ``MISSING`` stand-in at the end of its tar, so the stream keeps the positions (and
    a resume the samples) the manifest implies; more samples than listed raise ``ShardReadError``."""
    expected = expected or {}

    def stage(src: Iterator[dict[str, str]]) -> Iterator[dict[str, Any]]:
        for shard in src:
            url = shard["url"]
            got = 0
            try:
                for sample in wds.tarfile_to_samples(handler=_shard_error)(iter([shard])):
                    got += 1
                    yield sample
            finally:
                if shard.get("stream") is not None:  # webdataset's url_opener put it there and never closes it
                    shard["stream"].close()
            want = expected.get(url)
            if want is None or got == want:
                continue
            reason = (f"shard {url}{_against_manifest(url)}: its manifest lists {want} samples, the reader got {got}"
                      + (" (a corrupt tar header ends the tar early)" if got < want else ""))
            if got > want:
                raise ShardReadError(reason)
            for i in range(got, want):
                yield {"__key__": f"{Path(url).name}:missing{i}", "__url__": url, MISSING: reason}

    return stage


def _decoded_or_reason(decode: Any, sample: dict[str, Any]) -> Any:
    """``decode(sample)``, or the reason the sample is bad (a string)."""
    if MISSING in sample:
        return sample[MISSING]
    try:
        return decode(sample)
    except _bad_sample_errors() as e:
        return f"{type(e).__name__}: {e}"


def _fill_window(stream: _RawStream, bs: int, decode: Any, *, max_bad_run: int, bucket: str, step: int
                 ) -> tuple[list[tuple[dict[str, Any], Any]], list[dict[str, str]]]:
    """One step's window of ``bs`` samples decoded: ([(raw sample, decoded)] * bs, its bad samples).

    Bad samples are skipped with a warning; the batch keeps its size by taking the next good samples after the
    window (which then appear twice, once here and once in their own window), so which samples a step reads
    never depends on what decoded. More than ``max_bad_run`` bad ones in a row after the window stop at once."""
    good, bad = [], []
    for sample in stream.take(bs):
        got = _decoded_or_reason(decode, sample)
        if isinstance(got, str):
            bad.append({"key": str(sample.get("__key__")), "shard": str(sample.get("__url__")), "reason": got})
            warnings.warn(f"skipped bad {_where(sample)}: {got}", BadSampleWarning, stacklevel=3)
        else:
            good.append((sample, got))
    k = 0
    while len(good) < bs:
        # Fill from the samples after the window; a bad one there is counted in its own window.
        if k >= max_bad_run:
            shards = sorted({b["shard"] for b in bad})
            raise BadDataError(
                f"bucket {bucket}: could not fill a batch of {bs} for step {step}: {len(bad)} of its {bs} samples "
                f"are bad and the {k} after them gave only {len(good) - (bs - len(bad))} good "
                f"(max_bad_run {max_bad_run}); bad samples in shards {shards}; "
                f"first: {bad[0]['reason'] if bad else '?'}"
            )
        sample = stream.ahead(k)
        k += 1
        got = _decoded_or_reason(decode, sample)
        if not isinstance(got, str):
            good.append((sample, got))
    return good, bad


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
    rank: int = 0, world_size: int = 1, skip_samples: int = 0, expected: dict[str, int] | None = None,
) -> wds.DataPipeline:
    """Endless batches (B, 3, F, H, W) of one bucket for one rank, after skipping ``skip_samples``; every sample
    must decode (``BucketBatches`` is the trainer's loader, with the bad-sample budget)."""
    return wds.DataPipeline(
        _endless_shards(urls, seed, shardshuffle),
        _samples_of_tars(expected),
        wds.map(_no_missing),
        _take_rank(rank, world_size),
        _skip(skip_samples),
        wds.map(lambda s: decode_sample(s, bucket)),
        wds.batched(batch_size, collation_fn=_collate, partial=False),
    )


def _no_missing(sample: dict[str, Any]) -> dict[str, Any]:
    if MISSING in sample:
        raise ShardReadError(sample[MISSING])
    return sample


def bucket_for_step(seed: int, step: int, weights: tuple[float, ...]) -> int:
    """Index of the bucket that step ``step`` draws from; the same on every rank."""
    return random.Random(f"bucket:{seed}:{step}").choices(range(len(weights)), weights=weights)[0]


class BucketBatches:
    """Batches for successive steps, mixing buckets by weight; ``position`` (batches given per bucket) and
    ``budget.state_dict()`` (bad samples skipped) are the resumable state.

    Step windows as in the DiT loader (``_fill_window``): batch n of a bucket reads samples [n * B, (n + 1) * B) of
    its stream for this rank; a bad sample there is skipped, counted under the ``[data]`` budget and replaced by
    the next good one after the window.
    """

    def __init__(self, cfg: DataConfig, *, seed: int, rank: int, world_size: int,
                 position: dict[str, int] | None = None, budget: dict[str, Any] | None = None) -> None:
        if not cfg.buckets:
            raise ValueError("DataConfig.buckets is empty: nothing to train on")
        self.cfg = cfg
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.position = {b: 0 for b in cfg.buckets} | dict(position or {})
        self.budget = BadSampleBudget(cfg, budget)
        self._streams: dict[str, _RawStream] = {}
        self.urls = dataset_shards(cfg.root, cfg.buckets, allow_partial=cfg.allow_partial)  # before any step
        self.expected = listed_counts(cfg.root)

    def _stream(self, i: int) -> _RawStream:
        bucket = self.cfg.buckets[i]
        if bucket not in self._streams:
            self._streams[bucket] = _RawStream(
                self.urls[bucket], self.seed + i, self.cfg.shardshuffle, self.rank, self.world_size,
                self.position[bucket] * self.cfg.batch_sizes[i], self.expected,
            )
        return self._streams[bucket]

    def metrics(self) -> dict[str, float]:
        return self.budget.metrics()

    def batch(self, step: int) -> tuple[str, torch.Tensor]:
        """(bucket, (B, 3, F, H, W)) for ``step``."""
        i = bucket_for_step(self.seed, step, self.cfg.weights)
        bucket, bs = self.cfg.buckets[i], self.cfg.batch_sizes[i]
        good, bad = _fill_window(self._stream(i), bs, lambda s: decode_sample(s, bucket),
                                 max_bad_run=self.cfg.max_bad_run, bucket=bucket, step=step)
        self.position[bucket] += 1
        self.budget.account(bs, bad)
        return bucket, _collate([x for _, x in good])


def heldout_clips(cfg: DataConfig, *, rank: int, world_size: int) -> list[torch.Tensor]:
    """This rank's share of the first ``heldout_samples`` held-out samples, each (3, F, H, W)."""
    if not cfg.heldout_root:
        return []
    urls = dataset_shards(cfg.heldout_root, [cfg.heldout_bucket], allow_partial=cfg.allow_partial)[cfg.heldout_bucket]
    pipe = wds.DataPipeline(
        wds.SimpleShardList(urls),
        _samples_of_tars(listed_counts(cfg.heldout_root)),
        wds.map(_no_missing),  # held-out samples are few and fixed: a missing one is an error, not a skip
        wds.map(lambda s: decode_sample(s, cfg.heldout_bucket)),
    )
    clips = list(itertools.islice(pipe, cfg.heldout_samples))
    return clips[rank::world_size]


# ---------------------------------------------------------------------------------------------
# DiT batches: latents, text, fps and kind from bucketed shards, decoded in DataLoader workers
# ---------------------------------------------------------------------------------------------
#
# Step plan. Step s draws bucket bucket_for_step(seed, s) (as above: the same on every rank) and the
# next ``batch_size`` samples of that bucket's stream for this rank: its *window*. The plan is a pure
# function of (seed, start step, position), so each DataLoader worker can compute it and build only
# the steps ``start + 1 + w, start + 1 + w + n, ...`` that are its own, skipping the undecoded bytes
# of the other workers' windows; the DataLoader hands the workers' batches back in step order, so
# every ``num_workers`` (0 included) gives the same batches. The position is the number of samples
# each bucket's stream has consumed (whole windows), which is all a resume needs.
#
# Bad samples (no caption, undecodable bytes, wrong shape, missing from a damaged tar) are skipped with a
# warning and counted; the batch keeps its size by taking the next good samples after its window (which
# then appear twice, once here and once in their own window: ``_fill_window``, shared with the VAE loader),
# so the plan never depends on what decoded. The loader stops with an error naming the shard when the bad
# samples exceed the ``[data]`` budget (``BadSampleBudget``, the same as the VAE loader's).
#
# Precomputed members (catalog.shards: written by the precompute job, same bucket layout): ``latent.npy``
# holds the VAE posterior moments (2C, t, h, w), mean channels then log-variance channels, so the trainer
# keeps drawing posterior noise; ``text.npy`` the T5 states (L, D) and ``text_mask.npy`` their padding
# mask (L,). A sample with ``latent.npy`` needs no ``mp4``/``jpg``; ``txt`` (the caption) is always required.

LATENT_SCALE_FILE = "latent_scale.json"
"""File in a VAE checkpoint folder holding the measured latent scale factor (``save_latent_scale``)."""


def encode_precomputed(mean: torch.Tensor, logvar: torch.Tensor, embedding: torch.Tensor | None = None,
                       mask: torch.Tensor | None = None) -> dict[str, bytes]:
    """Shard members of a precomputed sample: ``latent.npy`` = the posterior moments (2C, t, h, w) as the
    VAE encoder emits them (mean channels, then log-variance channels), and, with a text encoding,
    ``text.npy`` = embedding (L, D) and ``text_mask.npy`` = mask (L,)."""
    if mean.shape != logvar.shape or mean.ndim != 4:
        raise ValueError(f"latent member: expected mean and logvar of one shape (C, t, h, w), got "
                         f"{tuple(mean.shape)} and {tuple(logvar.shape)}")
    moments = torch.cat([mean, logvar]).detach().cpu().float().numpy()  # (2C, t, h, w)
    files = {LATENT_KEY: encode_array(moments)}
    if embedding is not None:
        if embedding.ndim != 2 or mask is None or mask.shape != embedding.shape[:1]:
            raise ValueError(f"text member: expected embedding (L, D) and mask (L,), got "
                             f"{tuple(embedding.shape)} and {None if mask is None else tuple(mask.shape)}")
        files[TEXT_KEY] = encode_array(embedding.detach().cpu().float().numpy())
        files[TEXT_MASK_KEY] = encode_array(mask.detach().cpu().to(torch.uint8).numpy())
    return files


def decode_latent(data: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    """``latent.npy`` bytes -> (mean, logvar), each (C, t, h, w) float32."""
    moments = torch.from_numpy(decode_array(data)).float()
    if moments.ndim != 4 or moments.shape[0] % 2:
        raise ValueError(f"latent member: expected moments (2C, t, h, w), got {tuple(moments.shape)}")
    mean, logvar = moments.chunk(2)
    return mean, logvar


def decode_text(data: bytes, mask: bytes | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``text.npy`` (and ``text_mask.npy``) bytes -> (embedding (L, D) float32, mask (L,) bool)."""
    emb = torch.from_numpy(decode_array(data)).float()
    if emb.ndim != 2:
        raise ValueError(f"text member: expected an embedding (L, D), got {tuple(emb.shape)}")
    m = torch.ones(emb.shape[0], dtype=torch.bool) if mask is None else torch.from_numpy(decode_array(mask)).bool()
    if m.shape != emb.shape[:1]:
        raise ValueError(f"text mask member: expected ({emb.shape[0]},), got {tuple(m.shape)}")
    return emb, m


@dataclass(frozen=True, kw_only=True, slots=True)
class DiTDataConfig:
    root: str = ""
    """Folder holding one sub-folder of tars per bucket (``<F>x<H>x<W>``), pixels or precomputed."""
    buckets: tuple[str, ...] = ()
    """Buckets to train on, images ("1xHxW") and videos mixed, e.g. ["13x256x384", "1x256x384"]."""
    weights: tuple[float, ...] = ()
    """Relative probability of drawing each bucket on a step (same length as buckets)."""
    batch_sizes: tuple[int, ...] = ()
    """Per-rank batch size for each bucket (same length as buckets)."""
    shardshuffle: bool = True
    """Reshuffle the shard order every epoch (from the seed, so it is reproducible)."""
    num_workers: int = 2
    """DataLoader worker processes decoding ahead of the step; 0 decodes in the training process."""
    prefetch_factor: int = 2
    """Batches each worker prepares ahead."""
    max_bad_samples: int = 16
    """Bad samples (no caption, undecodable, wrong shape, missing from a damaged tar) a rank may skip before it
    stops; 0 stops at the first (``BadSampleBudget``)."""
    max_bad_fraction: float = 0.01
    """Also stop when more than this fraction of the samples read were bad (no caption, undecodable, wrong shape)."""
    bad_check_after: int = 100
    """Samples to read before the fraction is checked (one bad first sample is not yet a rate)."""
    max_bad_run: int = 64
    """Consecutive bad samples after a window (while filling its batch) that stop the loader at once."""
    latent_scale: float = 0.0
    """Latent scale factor; 0 takes the value measured and stored with the VAE checkpoint."""
    allow_partial: bool = False
    """Train on a shard folder without a complete manifest (a killed shard job's tars), with a warning; off, such a
    folder is refused naming what is missing."""

    def __post_init__(self) -> None:
        if not (len(self.buckets) == len(self.weights) == len(self.batch_sizes)):
            raise ValueError(
                "DiTDataConfig: buckets, weights and batch_sizes must have the same length, got "
                f"{len(self.buckets)}, {len(self.weights)}, {len(self.batch_sizes)}"
            )
        for b in self.buckets:
            parse_bucket(b)
        if any(w < 0 for w in self.weights) or (self.weights and sum(self.weights) <= 0):
            raise ValueError(f"DiTDataConfig.weights: expected non-negative with a positive sum, got {self.weights}")
        if any(n < 1 for n in self.batch_sizes):
            raise ValueError(f"DiTDataConfig.batch_sizes: expected >= 1 each, got {self.batch_sizes}")
        if self.num_workers < 0 or self.prefetch_factor < 1:
            raise ValueError(f"DiTDataConfig: expected num_workers >= 0 and prefetch_factor >= 1, got "
                             f"{self.num_workers} and {self.prefetch_factor}")
        check_budget("DiTDataConfig", self)
        if self.latent_scale < 0:
            raise ValueError(f"DiTDataConfig.latent_scale: expected > 0 (or 0 = from the VAE checkpoint), got {self.latent_scale}")


def _count_samples(url: str) -> int:
    import tarfile

    keys = set()
    with tarfile.open(url) as tar:
        for member in tar:  # headers only: tarfile seeks over the data
            if member.isfile():
                keys.add(member.name.split("/")[-1].split(".", 1)[0])
    return len(keys)


def check_data(cfg: DiTDataConfig) -> dict[str, int]:
    """Fail before any model is built: the shard folder must be complete (``dataset_shards``: manifest present,
    every listed tar there at its size) and every bucket must hold samples.

    Returns the sample count per bucket (from ``manifest.json`` when it lists the bucket, else -- a partial folder
    with ``allow_partial`` -- from the tar headers).
    """
    if not cfg.root:
        raise ValueError("data.root is empty: expected the folder of bucketed shards")
    if not Path(cfg.root).is_dir():
        raise FileNotFoundError(f"data.root {cfg.root}: expected a folder of bucketed shards, it does not exist")
    if not cfg.buckets:
        raise ValueError(f"data.buckets is empty: nothing to train on (shards under {cfg.root})")
    try:
        full = read_manifest(cfg.root)
    except ManifestError:
        full = None  # dataset_shards names it (or, with allow_partial, it counts as none)
    if full is not None and full["samples"] == 0:
        raise ValueError(f"data.root {cfg.root}: the selection is empty (its manifest.json lists 0 samples)")
    present = sorted(p.name for p in Path(cfg.root).iterdir() if p.is_dir())
    for bucket in cfg.buckets:
        if not (Path(cfg.root) / bucket).is_dir():
            raise FileNotFoundError(f"bucket {bucket}: expected the folder {Path(cfg.root) / bucket}; the root holds {present}")
    shards = dataset_shards(cfg.root, cfg.buckets, allow_partial=cfg.allow_partial)
    manifest = full["buckets"] if full is not None else {}
    counts = {}
    for bucket in cfg.buckets:
        folder = Path(cfg.root) / bucket
        urls = shards[bucket]
        entry = manifest.get(bucket)
        # The manifest's count when it describes exactly the tars read (a partial folder may lack some).
        exact = entry is not None and [str(Path(cfg.root) / s["shard"]) for s in entry["shards"]] == urls
        listed = entry["samples"] if exact else None
        counts[bucket] = int(listed) if listed is not None else sum(_count_samples(u) for u in urls)
        if counts[bucket] == 0:
            raise ValueError(f"bucket {bucket}: the selection is empty (0 samples in {len(urls)} shards under {folder})")
    return counts


def step_plan(cfg: DiTDataConfig, seed: int, start_step: int, position: dict[str, int]
              ) -> Iterator[tuple[int, int, int]]:
    """(step, bucket index, first sample of its window) for steps start_step + 1, start_step + 2, ..."""
    offsets = [int(position.get(b, 0)) for b in cfg.buckets]
    for step in itertools.count(start_step + 1):
        i = bucket_for_step(seed, step, cfg.weights)
        yield step, i, offsets[i]
        offsets[i] += cfg.batch_sizes[i]


class _RawStream:
    """One bucket's undecoded samples for one rank from sample ``start`` on, with look-ahead."""

    def __init__(self, urls: list[str], seed: int, shuffle: bool, rank: int, world_size: int, start: int,
                 expected: dict[str, int] | None = None) -> None:
        self._it = iter(wds.DataPipeline(
            _endless_shards(urls, seed, shuffle),
            _samples_of_tars(expected),
            _take_rank(rank, world_size),
            _skip(start),
        ))
        self.next_index = start
        self._ahead: list[dict] = []

    def take(self, n: int) -> list[dict]:
        out = self._ahead[:n]
        del self._ahead[:n]
        while len(out) < n:
            out.append(next(self._it))
        self.next_index += n
        return out

    def ahead(self, k: int) -> dict:
        """The k-th sample after the last one taken (0-based), without consuming it."""
        while len(self._ahead) <= k:
            self._ahead.append(next(self._it))
        return self._ahead[k]


def _caption(sample: dict[str, Any]) -> str:
    raw = sample.get("txt")
    text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    if not text or not text.strip():
        raise ValueError("no caption (the 'txt' member is missing or empty)")
    return text.strip()


def _fps(sample: dict[str, Any]) -> float:
    import json

    raw = sample.get("json")
    if raw is None:
        return 0.0
    fps = json.loads(raw).get("fps")
    return float(fps) if fps else 0.0


def decode_dit_sample(sample: dict[str, Any], bucket: str, spatial_factor: int = 8, temporal_factor: int = 4
                      ) -> dict[str, Any]:
    """A raw shard sample -> {"caption", "fps", and "pixels" (3, F, H, W) uint8 or "latent_mean",
    "latent_logvar" (C, t, h, w) float32; "text_embedding" (L, D), "text_mask" (L,) when present}.

    Raises ValueError/KeyError/OSError/av.FFmpegError for a bad sample (the caller counts and skips it).
    """
    out: dict[str, Any] = {"caption": _caption(sample), "fps": _fps(sample)}
    if LATENT_KEY in sample:
        mean, logvar = decode_latent(sample[LATENT_KEY])
        f, h, w = parse_bucket(bucket)
        expected = ((f - 1) // temporal_factor + 1, h // spatial_factor, w // spatial_factor)
        if tuple(mean.shape[1:]) != expected:
            raise ValueError(f"latent member: expected (C, t, h, w) with (t, h, w) = {expected} for bucket {bucket}, "
                             f"got {tuple(mean.shape)}")
        out["latent_mean"], out["latent_logvar"] = mean, logvar
    else:
        x = decode_sample(sample, bucket)  # (3, F, H, W) in [-1, 1], shape checked against the bucket
        # uint8 crosses the worker -> trainer queue at a quarter of float32's bytes, and exactly.
        out["pixels"] = ((x + 1.0) * 127.5).round().to(torch.uint8)
    if TEXT_KEY in sample:
        out["text_embedding"], out["text_mask"] = decode_text(sample[TEXT_KEY], sample.get(TEXT_MASK_KEY))
    return out


def _bad_sample_errors() -> tuple[type[BaseException], ...]:
    import av

    # ValueError covers wrong shapes and UnicodeDecodeError; OSError covers Pillow's unreadable images.
    return (ValueError, KeyError, OSError, EOFError, av.FFmpegError)


def _where(sample: dict[str, Any]) -> str:
    return f"sample {sample.get('__key__')} in shard {sample.get('__url__')}"


def _collate_dit(items: list[dict[str, Any]], step: int, bucket: str, where: list[str]) -> dict[str, Any]:
    kinds = {"latent" if "latent_mean" in it else "pixels" for it in items}
    texts = {"text_embedding" in it for it in items}
    if len(kinds) > 1 or len(texts) > 1:
        raise ValueError(f"bucket {bucket}: a batch mixes precomputed and pixel samples ({', '.join(where)}); "
                         "expected one kind of shard per bucket")
    f = parse_bucket(bucket)[0]
    batch: dict[str, Any] = {
        "step": step, "bucket": bucket, "kind": "image" if f == 1 else "video",
        "captions": [it["caption"] for it in items],
        "fps": torch.tensor([it["fps"] for it in items], dtype=torch.float32),  # (B,)
    }
    if "latent" in kinds:
        batch["latent_mean"] = torch.stack([it["latent_mean"] for it in items])  # (B, C, t, h, w)
        batch["latent_logvar"] = torch.stack([it["latent_logvar"] for it in items])  # (B, C, t, h, w)
    else:
        batch["pixels"] = torch.stack([it["pixels"] for it in items])  # (B, 3, F, H, W) uint8
    if texts == {True}:
        batch["text_embedding"] = torch.stack([it["text_embedding"] for it in items])  # (B, L, D)
        batch["text_mask"] = torch.stack([it["text_mask"] for it in items])  # (B, L)
    return batch


class DiTSampleStream(torch.utils.data.IterableDataset):
    """Endless DiT batches in step order, one bucket per step; see the step plan above.

    Yields dicts with ``step``, ``bucket``, ``kind`` ("image"/"video"), ``captions`` (B strings),
    ``fps`` (B,), either ``pixels`` (B, 3, F, H, W) uint8 or ``latent_mean``/``latent_logvar``
    (B, C, t, h, w), optionally ``text_embedding`` (B, L, D) and ``text_mask`` (B, L), ``keys`` (the
    B sample keys), ``window`` (samples of the stream the step consumed) and ``bad`` (the window's bad
    samples: dicts with ``key``, ``shard``, ``reason``).
    """

    def __init__(self, cfg: DiTDataConfig, *, seed: int, rank: int = 0, world_size: int = 1, start_step: int = 0,
                 position: dict[str, int] | None = None, spatial_factor: int = 8, temporal_factor: int = 4,
                 urls: dict[str, list[str]] | None = None, expected: dict[str, int] | None = None) -> None:
        super().__init__()
        if not cfg.buckets:
            raise ValueError("DiTDataConfig.buckets is empty: nothing to train on")
        self.cfg, self.seed, self.rank, self.world_size = cfg, seed, rank, world_size
        # Checked here, in the training process, so the workers only read what passed.
        self.urls = urls if urls is not None else dataset_shards(cfg.root, cfg.buckets, allow_partial=cfg.allow_partial)
        self.expected = expected if expected is not None else listed_counts(cfg.root)
        self.start_step = start_step
        self.position = {b: 0 for b in cfg.buckets} | dict(position or {})
        self.factors = (spatial_factor, temporal_factor)

    def _batch(self, stream: _RawStream, step: int, bucket: str, bs: int) -> dict[str, Any]:
        good, bad = _fill_window(stream, bs, lambda s: decode_dit_sample(s, bucket, *self.factors),
                                 max_bad_run=self.cfg.max_bad_run, bucket=bucket, step=step)
        batch = _collate_dit([item for _, item in good], step, bucket, [_where(sample) for sample, _ in good])
        batch |= {"keys": [str(sample.get("__key__")) for sample, _ in good], "window": bs, "bad": bad}
        return batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        streams: dict[int, _RawStream] = {}
        for n, (step, i, offset) in enumerate(step_plan(self.cfg, self.seed, self.start_step, self.position)):
            bucket, bs = self.cfg.buckets[i], self.cfg.batch_sizes[i]
            if i not in streams:
                streams[i] = _RawStream(self.urls[bucket], self.seed + i, self.cfg.shardshuffle,
                                        self.rank, self.world_size, offset, self.expected)
            stream = streams[i]
            assert stream.next_index == offset, (stream.next_index, offset)
            if n % workers != worker:
                stream.take(bs)  # another worker's window: read past it without decoding
                continue
            yield self._batch(stream, step, bucket, bs)


class DiTBatches:
    """The trainer's side of the DiT loader: iterates ``DiTSampleStream`` through a DataLoader (workers
    decode ahead while the step runs), counts bad samples and keeps the resumable state.

    ``state_dict()`` (store it in the checkpoint) is the state after the last batch the trainer
    received, not after what the workers prefetched; ``DiTBatches(..., state=saved)`` continues with the
    next step's batch exactly as an uninterrupted run would.
    """

    def __init__(self, cfg: DiTDataConfig, *, seed: int, rank: int = 0, world_size: int = 1,
                 state: dict[str, Any] | None = None, spatial_factor: int = 8, temporal_factor: int = 4) -> None:
        state = state or {}
        self.cfg, self.seed, self.rank, self.world_size = cfg, seed, rank, world_size
        self.step = int(state.get("step", 0))
        self.position = {b: 0 for b in cfg.buckets} | {k: int(v) for k, v in state.get("position", {}).items()}
        self.budget = BadSampleBudget(cfg, state)
        self.factors = (spatial_factor, temporal_factor)
        self.urls = dataset_shards(cfg.root, cfg.buckets, allow_partial=cfg.allow_partial)  # before any step
        self.expected = listed_counts(cfg.root)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "position": dict(self.position)} | self.budget.state_dict()

    def metrics(self) -> dict[str, float]:
        """Counters for the step metrics (this rank's)."""
        return self.budget.metrics()

    def loader(self) -> torch.utils.data.DataLoader:
        stream = DiTSampleStream(self.cfg, seed=self.seed, rank=self.rank, world_size=self.world_size,
                                 start_step=self.step, position=self.position,
                                 spatial_factor=self.factors[0], temporal_factor=self.factors[1], urls=self.urls,
                                 expected=self.expected)
        n = self.cfg.num_workers
        return torch.utils.data.DataLoader(
            stream, batch_size=None, num_workers=n, prefetch_factor=self.cfg.prefetch_factor if n else None,
            pin_memory=torch.cuda.is_available(), persistent_workers=False,
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        it = iter(self.loader())
        try:
            for batch in it:
                if batch["step"] != self.step + 1:
                    raise RuntimeError(f"DiT loader: expected the batch of step {self.step + 1}, got step {batch['step']}")
                self._account(batch)
                yield batch
        finally:
            # Stop the workers now: an exception's traceback keeps the DataLoader iterator (and, until it is
            # collected, its worker processes) alive; DataLoader has no public close.
            shutdown = getattr(it, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    def _account(self, batch: dict[str, Any]) -> None:
        self.step = batch["step"]
        self.position[batch["bucket"]] += batch["window"]
        self.budget.account(batch["window"], batch["bad"])


# ---------------------------------------------------------------------------------------------
# From a batch to the DiT's inputs: latents (scaled posterior samples) and text
# ---------------------------------------------------------------------------------------------


def posterior_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """CPU generator for the posterior noise of one step and rank: the same noise whether the moments
    came from the VAE on the fly or from precomputed shards, and after a resume."""
    import hashlib

    digest = hashlib.sha256(f"posterior:{seed}:{step}:{rank}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def sample_posterior(mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """z = mean + exp(logvar / 2) * eps, eps drawn on the CPU from ``generator`` (device-independent)."""
    eps = torch.randn(mean.shape, generator=generator, dtype=torch.float32).to(mean.device)
    return mean.float() + torch.exp(0.5 * logvar.float()) * eps


def pixels_to_float(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, F, H, W) -> float32 in [-1, 1] (the VAE's input)."""
    return pixels.float() / 127.5 - 1.0


@torch.no_grad()
def batch_latents(batch: dict[str, Any], *, scale: float, vae: torch.nn.Module | None = None,
                  generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """The DiT's x0: scaled posterior sample (B, C, t, h, w), from precomputed moments when the batch
    has them, else from the frozen VAE (``CausalVAE.encode_moments``) on ``device``."""
    if "latent_mean" in batch:
        mean, logvar = batch["latent_mean"].to(device), batch["latent_logvar"].to(device)
    else:
        if vae is None:
            raise ValueError(f"bucket {batch['bucket']}: the batch holds pixels, so a VAE is needed to encode them")
        mean, logvar = vae.encode_moments(pixels_to_float(batch["pixels"].to(device)))  # (B, C, t, h, w) each
    return sample_posterior(mean, logvar, generator) * scale


def batch_text(batch: dict[str, Any], *, encoder: Any = None, device: torch.device | str = "cpu"
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(embedding (B, L, D), mask (B, L) bool): precomputed when the batch has them, else from the
    frozen text encoder (``trainer.text.TextEncoder``) on the captions."""
    if "text_embedding" in batch:
        return batch["text_embedding"].to(device), batch["text_mask"].to(device).bool()
    if encoder is None:
        raise ValueError(f"bucket {batch['bucket']}: the batch has no precomputed text, so a text encoder is needed")
    emb, mask = encoder.encode(batch["captions"])
    return emb.to(device), mask.to(device)


# ---------------------------------------------------------------------------------------------
# Latent scale factor: 1 / std of the VAE's posterior samples, stored with the VAE checkpoint
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def measure_latent_scale(vae: torch.nn.Module, clips: Iterable[torch.Tensor], *, seed: int = 0,
                         device: torch.device | str = "cpu") -> dict[str, float]:
    """1 / std of posterior samples over ``clips`` (each (B, 3, F, H, W) in [-1, 1]), as CogVideoX's
    1.15258426 was measured; returns {"latent_scale", "std", "mean", "elements", "clips"}."""
    generator = torch.Generator().manual_seed(seed)
    total, total_sq, count, n = 0.0, 0.0, 0, 0
    was_training = vae.training
    vae.eval()
    for x in clips:
        mean, logvar = vae.encode_moments(x.to(device))
        z = sample_posterior(mean, logvar, generator).double()
        total, total_sq, count, n = total + float(z.sum()), total_sq + float((z * z).sum()), count + z.numel(), n + x.shape[0]
    vae.train(was_training)
    if count == 0:
        raise ValueError("measure_latent_scale: expected at least one clip, got none")
    mu = total / count
    std = math.sqrt(max(total_sq / count - mu * mu, 0.0))
    if std == 0.0:
        raise ValueError("measure_latent_scale: the latents have zero spread; expected a trained VAE")
    return {"latent_scale": 1.0 / std, "std": std, "mean": mu, "elements": float(count), "clips": float(n)}


def save_latent_scale(checkpoint_dir: str | Path, measured: dict[str, float]) -> Path:
    """Write ``measure_latent_scale``'s result into the VAE checkpoint folder."""
    import json

    path = Path(checkpoint_dir) / LATENT_SCALE_FILE
    path.write_text(json.dumps(measured, indent=1))
    return path


def resolve_latent_scale(override: float, vae_checkpoint: str | Path | None) -> float:
    """The config value when set (> 0), else the one stored with the VAE checkpoint; raises when neither."""
    import json

    if override > 0:
        return float(override)
    path = Path(vae_checkpoint) / LATENT_SCALE_FILE if vae_checkpoint else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"latent scale: data.latent_scale is 0 (take it from the VAE checkpoint) but {path} does not exist; "
            "measure it with trainer.data.measure_latent_scale or set data.latent_scale"
        )
    return float(json.loads(path.read_text())["latent_scale"])
