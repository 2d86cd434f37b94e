"""Bucketed WebDataset shards: cut, resample, crop, resize, encode, verify, and write tars.

One sample per selected clip and frame stride (``[buckets] strides``; stride 1 only by default), in the bucket
``pipeline.buckets`` chose for it at that stride:

- ``render_clip`` (one clip; runs in a Ray task): read the span from the source, take the
  source frames nearest the bucket's timestamps, centre-crop to the bucket aspect, resize
  (area when shrinking, bicubic when enlarging), encode H.264 mp4 in memory (jpg for images),
  then decode what was encoded and check it is exactly F×H×W. A mismatch or an unreadable
  source becomes an error row, never a bad sample.
- ``build_shards``: plan, render (through the caller's ``render_many``, e.g. Ray), write with
  ``catalog.shards.BucketTarWriter``, and last of all write the manifest (``catalog.shards.make_manifest``:
  every tar's samples, size and sha256, plus the selection hash that makes a re-run of the same selection
  into the same output a no-op). Until then the folder has no manifest, and readers refuse it.

The format itself (layout, sample keys, manifest, tar writer, the H.264 encoder and the decoders) is
``catalog.shards``, the contract the trainer reads by; this module only decides what goes in.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from catalog.shards import (
    IMAGE_KEY,
    MANIFEST,
    SHARDS_VERSION,
    VIDEO_KEY,
    Bucket,
    BucketTarWriter,
    ManifestError,
    SampleShapeError,
    encode_h264,
    encode_jpg,
    is_bucket_dir,
    is_shard_name,
    is_tmp_shard_name,
    make_manifest,
    manifest_is_complete,
    manifest_version,
    read_manifest,
    sample_files,
    sample_key,
    verify_sample,
    write_manifest,
)
from pipeline.buckets import BucketConfig, crop_box, explain_bucket, source_frame_indices

# Clip columns copied into each sample's json as scores (names from catalog.schema.CLIPS).
SCORE_COLUMNS = (
    "sharpness_min", "sharpness_median", "motion_mean", "motion_max", "overlay_score",
    "watermark_prob", "watermark_max", "aesthetic_mean", "aesthetic_min", "caption_similarity",
)


class OutputConflictError(RuntimeError):
    """The output folder already holds shards of a different selection."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ShardConfig:
    """TOML section ``[shards]``."""

    maxcount: int = 1000
    """Samples per tar before rolling over to the next one."""
    maxsize: int = 300_000_000
    """Bytes per tar before rolling over (a tar holds at least one sample)."""
    crf: int = 18
    """x264 constant rate factor: 18 is visually near-lossless, so training sees few codec artefacts."""
    preset: str = "medium"
    """x264 preset: slower presets give smaller files at the same quality."""
    jpeg_quality: int = 95
    """Pillow JPEG quality for image samples."""

    def __post_init__(self) -> None:
        if self.maxcount < 1:
            raise ValueError(f"shards.maxcount: expected >= 1, got {self.maxcount}")
        if self.maxsize < 1:
            raise ValueError(f"shards.maxsize: expected >= 1 byte, got {self.maxsize}")
        if not 0 <= self.crf <= 51:
            raise ValueError(f"shards.crf: expected 0..51, got {self.crf}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"shards.jpeg_quality: expected 1..100, got {self.jpeg_quality}")


# ---------------------------------------------------------------------------------------------------------
# Planning: which clip goes to which bucket. Pure.


@dataclass(frozen=True, slots=True)
class PlannedClip:
    """A selected clip (its catalog row as a dict) at one frame stride, and the bucket it goes to.

    ``bucket.fps`` is the sample's own rate: ``[buckets] fps / stride``."""

    row: dict[str, Any]
    bucket: Bucket
    key: str
    stride: int = 1


@dataclass(frozen=True, slots=True)
class Plan:
    clips: tuple[PlannedClip, ...]
    skipped: tuple[tuple[str, str], ...]  # (clip_id, reason) for clips that fit no bucket at any stride
    selected: int = 0  # rows planned (each gets one sample per stride that fits, or a skipped entry)
    stride_skips: tuple[tuple[str, int, str], ...] = ()  # (clip_id, stride, reason): a stride that fit no bucket
    # for a clip written at another stride


def plan_shards(rows: Iterable[dict[str, Any]], cfg: BucketConfig) -> Plan:
    """Assign every row a bucket per frame stride; order by bucket, clip id, stride so the tars come out the same
    every run."""
    clips, skipped, stride_skips, selected = [], [], [], 0
    for row in rows:
        selected += 1
        is_image = bool(row["is_image"])
        strides = (1,) if is_image else (cfg.all_strides or (1,))
        planned, reasons = [], []
        for stride in strides:
            bucket, reason = explain_bucket(
                row["frames"], row["fps"], row["width"], row["height"], is_image, cfg, stride
            )
            if bucket is None:
                reasons.append((stride, reason))
            else:
                planned.append(PlannedClip(row, bucket, sample_key(row["clip_id"], stride), stride))
        if planned:
            clips.extend(planned)
            stride_skips.extend((row["clip_id"], st, r) for st, r in reasons)
        else:
            # The first stride's reason leads (the summary groups by the text before its first ':').
            first = reasons[0][1]
            rest = "; ".join(f"stride {st}: {r}" for st, r in reasons[1:])
            skipped.append((row["clip_id"], f"{first} ({rest})" if rest else first))
    clips.sort(key=lambda c: (c.bucket.name, c.row["clip_id"], c.stride))
    return Plan(tuple(clips), tuple(sorted(skipped)), selected, tuple(sorted(stride_skips)))


def manifest_buckets(plan: Plan, cfg: BucketConfig) -> dict[str, Bucket]:
    """{name: Bucket} of the planned buckets at their base rate (``[buckets] fps``; 0 for images): one bucket may
    hold samples of several strides, whose own rates their json gives."""
    return {c.bucket.name: Bucket(c.bucket.frames, c.bucket.height, c.bucket.width,
                                  0.0 if c.bucket.is_image else cfg.fps) for c in plan.clips}


def selection_hash(plan: Plan, where: str, buckets: BucketConfig, shards: ShardConfig) -> str:
    """Hash of everything that decides the output's bytes: rows, buckets, encoder settings, version."""
    payload = {
        "version": SHARDS_VERSION,
        "where": where,
        "buckets": asdict(buckets),
        "shards": asdict(shards),
        "clips": [[c.bucket.name, c.stride, c.row] for c in plan.clips],
        "skipped": plan.skipped,
        "stride_skips": plan.stride_skips,
    }
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------------
# One clip -> one sample.


@dataclass(frozen=True, slots=True)
class RenderResult:
    """What a render task sends back: the sample's files, or why there is none."""

    clip_id: str
    key: str
    bucket: str
    files: dict[str, bytes] | None = None
    error: str | None = None


def crop_resize(frames: np.ndarray, bucket: Bucket) -> np.ndarray:
    """(N, h, w, 3) uint8 -> (N, H, W, 3): centre crop to the bucket aspect, then resize (no stretch)."""
    n, h, w, _ = frames.shape
    x0, y0, x1, y1 = crop_box(w, h, bucket)
    crop = frames[:, y0:y1, x0:x1]
    if crop.shape[1:3] == (bucket.height, bucket.width):
        return np.ascontiguousarray(crop)
    # Area averaging when shrinking avoids aliasing; bicubic when (slightly) enlarging.
    interp = cv2.INTER_AREA if bucket.width <= (x1 - x0) else cv2.INTER_CUBIC
    out = np.empty((n, bucket.height, bucket.width, 3), dtype=np.uint8)
    for i in range(n):
        out[i] = cv2.resize(crop[i], (bucket.width, bucket.height), interpolation=interp)
    return out


def encode_mp4(frames: np.ndarray, fps: float, cfg: ShardConfig) -> bytes:
    """(F, H, W, 3) RGB uint8 -> H.264 mp4 bytes with the configured quality (``catalog.shards.encode_h264``)."""
    return encode_h264(frames, fps, options={"crf": str(cfg.crf), "preset": cfg.preset})


def read_clip_frames(row: dict[str, Any], indices: np.ndarray, max_side: int | None) -> np.ndarray:
    """The source frames ``start_frame + indices`` of a clip, RGB in display orientation."""
    from pipeline import media  # decoders load only in the processes that render

    path = row["video_uri"]
    info = media.probe(path)
    start = int(row["start_frame"] or 0)
    frames = media.read_span(path, info, start, start + int(indices[-1]) + 1, max_side=max_side)
    if len(frames) <= indices[-1]:
        raise SampleShapeError(
            f"{path}: span {start}..{start + int(indices[-1]) + 1} gave {len(frames)} frames,"
            f" expected at least {int(indices[-1]) + 1}"
        )
    return frames[indices]


def decode_side(row: dict[str, Any], bucket: Bucket) -> int | None:
    """Longer side to decode at: just above what the crop needs, so large sources decode small."""
    width, height = int(row["width"]), int(row["height"])
    x0, y0, x1, y1 = crop_box(width, height, bucket)
    scale = max(bucket.width / (x1 - x0), bucket.height / (y1 - y0))
    if scale >= 0.9:
        return None
    # The margin keeps the decoded crop at least bucket-sized after the decoder rounds its sides.
    return int(max(width, height) * scale * 1.05) + 4


def render_sample(row: dict[str, Any], bucket: Bucket, cfg: ShardConfig) -> tuple[str, bytes, np.ndarray]:
    """Read, resample, crop/resize and encode one clip: (ext, bytes, absolute source frame numbers)."""
    if bucket.is_image:
        indices = np.zeros(1, dtype=np.int64)
    else:
        indices = source_frame_indices(bucket.frames, float(row["fps"]), bucket.fps)
    frames = read_clip_frames(row, indices, decode_side(row, bucket))  # (F, h, w, 3)
    pixels = crop_resize(frames, bucket)  # (F, H, W, 3)
    if bucket.is_image:
        ext, data = IMAGE_KEY, encode_jpg(pixels[0], cfg.jpeg_quality)
    else:
        ext, data = VIDEO_KEY, encode_mp4(pixels, bucket.fps, cfg)
    verify_sample(ext, data, bucket)
    return ext, data, indices + int(row["start_frame"] or 0)


def sample_json(row: dict[str, Any], bucket: Bucket, source_frames: np.ndarray, stride: int = 1) -> dict[str, Any]:
    """The sample's json: ``fps`` is its own frame rate (``[buckets] fps / stride``, 0 for images), the rate the
    trainer's fps conditioning is given; ``source_fps`` the source video's."""
    return {
        "clip_id": row["clip_id"],
        "video_id": row["video_id"],
        "source_uri": row["video_uri"],
        "span": {k: row.get(k) for k in ("start_frame", "end_frame", "start_s", "end_s")},
        "source_fps": row["fps"],
        "fps": bucket.fps,
        "stride": stride,
        "frames": bucket.frames,
        "source_frames": [int(i) for i in source_frames],
        "crop": list(crop_box(int(row["width"]), int(row["height"]), bucket)),
        "bucket": bucket.name,
        "scores": {k: row.get(k) for k in SCORE_COLUMNS},
        "caption_model": row.get("caption_model"),
    }


def render_clip(clip: PlannedClip, cfg: ShardConfig) -> RenderResult:
    """One planned clip -> its sample files, or an error row. Never raises for a bad clip."""
    row, bucket = clip.row, clip.bucket
    try:
        ext, data, source_frames = render_sample(row, bucket, cfg)
    # One unreadable source or failed check must not abort a shard run of thousands of clips;
    # the error row keeps the class and message, and the manifest lists it.
    except Exception as err:  # noqa: BLE001
        return RenderResult(row["clip_id"], clip.key, bucket.name, error=f"{type(err).__name__}: {err}")
    files = sample_files(ext, data, row.get("caption") or "", sample_json(row, bucket, source_frames, clip.stride))
    return RenderResult(row["clip_id"], clip.key, bucket.name, files=files)


# ---------------------------------------------------------------------------------------------------------
# Output folder.


def clean_output(out_dir: Path) -> None:
    """Remove tars and temporaries of an earlier, unfinished or different write (only names this module writes)."""
    if not out_dir.is_dir():
        return
    for sub in out_dir.iterdir():
        if sub.is_dir() and is_bucket_dir(sub.name):
            for f in sub.iterdir():
                if is_shard_name(f.name) or is_tmp_shard_name(f.name):
                    f.unlink()
            if not any(sub.iterdir()):
                sub.rmdir()


# ---------------------------------------------------------------------------------------------------------
# Manifest and the whole build.


@dataclass
class BuildResult:
    status: str  # "written" or "unchanged"
    manifest: dict[str, Any]
    errors: list[tuple[str, str]] = field(default_factory=list)


RenderMany = Callable[[Sequence[PlannedClip], ShardConfig], Iterator[RenderResult]]


def render_serially(clips: Sequence[PlannedClip], cfg: ShardConfig) -> Iterator[RenderResult]:
    """In-process ``RenderMany`` (tests, benches); the job passes a Ray one."""
    for clip in clips:
        yield render_clip(clip, cfg)


def build_shards(
    rows: Iterable[dict[str, Any]],
    out_dir: str | Path,
    *,
    where: str,
    buckets: BucketConfig,
    shards: ShardConfig,
    render_many: RenderMany = render_serially,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> BuildResult:
    """Write the shards for selected clip rows (kept_clips columns plus ``video_uri``).

    A complete output of the same selection is left untouched (status "unchanged"); an output
    of a different selection raises ``OutputConflictError`` unless ``overwrite``.
    """
    out_dir = Path(out_dir)
    plan = plan_shards(rows, buckets)
    digest = selection_hash(plan, where, buckets, shards)
    try:
        old = read_manifest(out_dir)
    except ManifestError as err:
        if not overwrite:
            version = manifest_version(out_dir)
            if version is not None and version != SHARDS_VERSION:
                held = f"shards in format version {version} (this writer writes version {SHARDS_VERSION})"
            else:
                held = f"a manifest this writer cannot read ({err})"
            raise OutputConflictError(
                f"{out_dir} holds {held}; expected an empty folder or shards of the same selection. Replace them"
                " with overwrite=True (jobs.shards --overwrite) or pick another output."
            ) from err
        old = None
    if old is not None and old.get("selection_hash") == digest and manifest_is_complete(old, out_dir):
        _remove_temporaries(out_dir)
        return BuildResult("unchanged", old)
    if old is not None and old.get("selection_hash") != digest and not overwrite:
        if old["version"] != SHARDS_VERSION:
            held = f"shards in format version {old['version']} (this writer writes version {SHARDS_VERSION})"
        else:
            held = f"shards of another selection ({old.get('where')!r}, {old.get('samples')} samples)"
        raise OutputConflictError(
            f"{out_dir} holds {held}; expected an empty folder or the same selection. Replace them with"
            " overwrite=True (jobs.shards --overwrite) or pick another output."
        )
    # The old manifest goes first and the new one is written after the last tar: a folder that has a manifest is
    # complete, and a killed run leaves none (the trainer refuses such a folder, naming what is missing).
    (out_dir / MANIFEST).unlink(missing_ok=True)
    clean_output(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    writers: dict[str, BucketTarWriter] = {}
    errors: list[tuple[str, str]] = []
    done = 0
    try:
        for result in render_many(plan.clips, shards):
            done += 1
            if result.files is None:
                errors.append((result.clip_id, result.error or "unknown error"))
            else:
                if result.bucket not in writers:
                    writers[result.bucket] = BucketTarWriter(
                        out_dir, result.bucket, maxcount=shards.maxcount, maxsize=shards.maxsize
                    )
                writers[result.bucket].write(result.key, result.files)
            if progress is not None:
                progress(done, len(plan.clips))
        infos = [info for w in writers.values() for info in w.close()]
    except BaseException:
        for w in writers.values():
            w.abort()
        raise

    manifest = make_manifest(
        infos, manifest_buckets(plan, buckets),
        selection_hash=digest,
        where=where,
        buckets_config=asdict(buckets),
        shards_config=asdict(shards),
        selected=plan.selected,
        skipped=[{"clip_id": c, "reason": r} for c, r in plan.skipped],
        stride_skips=[{"clip_id": c, "stride": st, "reason": r} for c, st, r in plan.stride_skips],
        errors=[{"clip_id": c, "error": e} for c, e in errors],
    )
    write_manifest(out_dir, manifest)
    return BuildResult("written", manifest, errors)


def _remove_temporaries(out_dir: Path) -> None:
    for sub in out_dir.iterdir():
        if sub.is_dir() and is_bucket_dir(sub.name):
            for f in sub.iterdir():
                if is_tmp_shard_name(f.name):
                    f.unlink()
