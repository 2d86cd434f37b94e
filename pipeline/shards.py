"""Bucketed WebDataset shards: cut, resample, crop, resize, encode, verify, and write tars.

One sample per selected clip, in the bucket ``pipeline.buckets`` chose for it:

- ``render_clip`` (one clip; runs in a Ray task): read the span from the source, take the
  source frames nearest the bucket's timestamps, centre-crop to the bucket aspect, resize
  (area when shrinking, bicubic when enlarging), encode H.264 mp4 in memory (jpg for images),
  then decode what was encoded and check it is exactly F×H×W. A mismatch or an unreadable
  source becomes an error row, never a bad sample.
- ``BucketTarWriter``: ``OUT/<F>x<H>x<W>/shard-000000.tar``, rolled over at ``maxcount`` samples
  or ``maxsize`` bytes. Each tar is written as ``.shard-000000.tar.tmp`` and renamed only when
  complete, so a crash never leaves a half tar under a final name.
- ``build_shards``: plan, render (through the caller's ``render_many``, e.g. Ray), write, and
  finally write ``manifest.json`` (buckets, shards, counts, and the selection hash that makes a
  re-run of the same selection into the same output a no-op).

Sample keys: ``mp4``/``jpg``, ``txt`` (caption), ``json`` (clip id, source video id, span,
fps, scores, bucket). ``__key__`` comes from the clip id (see ``sample_key``).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np
from PIL import Image

from pipeline.buckets import Bucket, BucketConfig, crop_box, explain_bucket, source_frame_indices

MANIFEST = "manifest.json"
# Bump when the bytes written for the same clip and config change (encoder settings, json layout).
SHARDS_VERSION = "1"
# Clip columns copied into each sample's json as scores (names from catalog.schema.CLIPS).
SCORE_COLUMNS = (
    "sharpness_min", "sharpness_median", "motion_mean", "motion_max", "overlay_score",
    "watermark_prob", "watermark_max", "aesthetic_mean", "aesthetic_min", "caption_similarity",
)
_BUCKET_DIR = re.compile(r"^\d+x\d+x\d+$")
_SHARD_NAME = re.compile(r"^shard-\d{6}\.tar$")
_TMP_NAME = re.compile(r"^\.shard-\d{6}\.tar\.tmp$")


class SampleShapeError(RuntimeError):
    """An encoded sample does not decode to its bucket's frames × height × width."""


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
    """A selected clip (its catalog row as a dict) and the bucket it goes to."""

    row: dict[str, Any]
    bucket: Bucket
    key: str


@dataclass(frozen=True, slots=True)
class Plan:
    clips: tuple[PlannedClip, ...]
    skipped: tuple[tuple[str, str], ...]  # (clip_id, reason) for clips that fit no bucket


def sample_key(clip_id: str) -> str:
    """WebDataset ``__key__`` for a clip: readable, deterministic, unique, and free of '.' and '/'.

    WebDataset splits a member name at the first '.' of its basename, so the id's other
    characters become '_' and a short hash of the exact id keeps two ids that differ only
    in those characters apart.
    """
    readable = re.sub(r"[^A-Za-z0-9-]", "_", clip_id)
    return f"{readable}_{hashlib.sha256(clip_id.encode()).hexdigest()[:8]}"


def plan_shards(rows: Iterable[dict[str, Any]], cfg: BucketConfig) -> Plan:
    """Assign every row a bucket; order by bucket then clip id so the tars come out the same every run."""
    clips, skipped = [], []
    for row in rows:
        bucket, reason = explain_bucket(
            row["frames"], row["fps"], row["width"], row["height"], bool(row["is_image"]), cfg
        )
        if bucket is None:
            skipped.append((row["clip_id"], reason))
        else:
            clips.append(PlannedClip(row, bucket, sample_key(row["clip_id"])))
    clips.sort(key=lambda c: (c.bucket.name, c.row["clip_id"]))
    return Plan(tuple(clips), tuple(sorted(skipped)))


def selection_hash(plan: Plan, where: str, buckets: BucketConfig, shards: ShardConfig) -> str:
    """Hash of everything that decides the output's bytes: rows, buckets, encoder settings, version."""
    payload = {
        "version": SHARDS_VERSION,
        "where": where,
        "buckets": asdict(buckets),
        "shards": asdict(shards),
        "clips": [[c.bucket.name, c.row] for c in plan.clips],
        "skipped": plan.skipped,
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
    """(F, H, W, 3) RGB uint8 -> H.264 yuv420p mp4 bytes. Single-threaded x264 is byte-reproducible."""
    f, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"yuv420p needs even sizes, got {w}x{h}")
    rate = Fraction(fps).limit_denominator(1001)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.codec_context.thread_count = 1
        stream.options = {"crf": str(cfg.crf), "preset": cfg.preset}
        for i in range(f):
            frame = av.VideoFrame.from_ndarray(frames[i], format="rgb24")
            frame.pts = i
            frame.time_base = 1 / rate
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return buf.getvalue()


def encode_jpg(frame: np.ndarray, cfg: ShardConfig) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="JPEG", quality=cfg.jpeg_quality)
    return buf.getvalue()


def decode_mp4(data: bytes) -> np.ndarray:
    """mp4 bytes -> (F, H, W, 3) RGB uint8."""
    with av.open(io.BytesIO(data)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    if not frames:
        return np.zeros((0, 0, 0, 3), dtype=np.uint8)
    return np.stack(frames)


def decode_jpg(data: bytes) -> np.ndarray:
    """jpg bytes -> (1, H, W, 3) RGB uint8."""
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))[None]


def decoded_shape(ext: str, data: bytes) -> tuple[int, int, int]:
    """(frames, height, width) a decoder gets from a sample; every frame is decoded, none converted to RGB."""
    if ext == "jpg":
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return 1, img.height, img.width
    sizes = set()
    n = 0
    with av.open(io.BytesIO(data)) as container:
        for frame in container.decode(video=0):
            sizes.add((frame.height, frame.width))
            n += 1
    if len(sizes) != 1:
        return n, -1, -1  # no frames, or frames of different sizes: matches no bucket
    return (n, *sizes.pop())


def verify_sample(ext: str, data: bytes, bucket: Bucket) -> None:
    """Decode what was written; raise ``SampleShapeError`` unless it is exactly the bucket's F×H×W."""
    got = decoded_shape(ext, data)
    want = (bucket.frames, bucket.height, bucket.width)
    if got != want:
        raise SampleShapeError(f"{ext} sample decodes to {got[0]}x{got[1]}x{got[2]}, expected bucket {bucket.name}")


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
        ext, data = "jpg", encode_jpg(pixels[0], cfg)
    else:
        ext, data = "mp4", encode_mp4(pixels, bucket.fps, cfg)
    verify_sample(ext, data, bucket)
    return ext, data, indices + int(row["start_frame"] or 0)


def sample_json(row: dict[str, Any], bucket: Bucket, source_frames: np.ndarray) -> dict[str, Any]:
    return {
        "clip_id": row["clip_id"],
        "video_id": row["video_id"],
        "source_uri": row["video_uri"],
        "span": {k: row.get(k) for k in ("start_frame", "end_frame", "start_s", "end_s")},
        "source_fps": row["fps"],
        "fps": bucket.fps,
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
    meta = json.dumps(sample_json(row, bucket, source_frames), sort_keys=True, default=str)
    files = {ext: data, "txt": (row.get("caption") or "").encode(), "json": meta.encode()}
    return RenderResult(row["clip_id"], clip.key, bucket.name, files=files)


# ---------------------------------------------------------------------------------------------------------
# Tars.


@dataclass
class ShardInfo:
    shard: str  # relative to the output folder
    bucket: str
    samples: int
    bytes: int


def _tar_member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0  # fixed metadata: same input, same bytes
    return info, io.BytesIO(data)


class BucketTarWriter:
    """Sequential tars of one bucket; each appears under its final name only once complete."""

    def __init__(self, out_dir: Path, bucket: str, *, maxcount: int, maxsize: int) -> None:
        self.dir = Path(out_dir) / bucket
        self.bucket, self.maxcount, self.maxsize = bucket, maxcount, maxsize
        self.done: list[ShardInfo] = []
        self._tar: tarfile.TarFile | None = None
        self._count = self._bytes = 0

    def write(self, key: str, files: dict[str, bytes]) -> str:
        """Add one sample; returns the shard (relative path) it went to."""
        size = sum(512 + -(-len(d) // 512) * 512 for d in files.values())
        if self._tar is not None and (self._count >= self.maxcount or self._bytes + size > self.maxsize):
            self._finish()
        if self._tar is None:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._tar = tarfile.open(self._tmp_path(len(self.done)), "w", format=tarfile.PAX_FORMAT)
            self._count = self._bytes = 0
        for ext, data in files.items():
            self._tar.addfile(*_tar_member(f"{key}.{ext}", data))
        self._count += 1
        self._bytes += size
        return f"{self.bucket}/{self._final_path(len(self.done)).name}"

    def close(self) -> list[ShardInfo]:
        if self._tar is not None:
            self._finish()
        return self.done

    def abort(self) -> None:
        """Drop the tar being written (used when the run fails part-way)."""
        if self._tar is not None:
            self._tar.close()
            self._tmp_path(len(self.done)).unlink(missing_ok=True)
            self._tar = None

    def _tmp_path(self, index: int) -> Path:
        return self.dir / f".shard-{index:06d}.tar.tmp"

    def _final_path(self, index: int) -> Path:
        return self.dir / f"shard-{index:06d}.tar"

    def _finish(self) -> None:
        index = len(self.done)
        assert self._tar is not None, "no open tar to finish"
        self._tar.close()
        tmp, final = self._tmp_path(index), self._final_path(index)
        with tmp.open("rb+") as fh:
            os.fsync(fh.fileno())  # the bytes reach the disk before the name says the tar is complete
        os.replace(tmp, final)
        self.done.append(ShardInfo(f"{self.bucket}/{final.name}", self.bucket, self._count, final.stat().st_size))
        self._tar = None


def clean_output(out_dir: Path) -> None:
    """Remove tars and temporaries of an earlier, unfinished or different write (only names this module writes)."""
    if not out_dir.is_dir():
        return
    for sub in out_dir.iterdir():
        if sub.is_dir() and _BUCKET_DIR.match(sub.name):
            for f in sub.iterdir():
                if _SHARD_NAME.match(f.name) or _TMP_NAME.match(f.name):
                    f.unlink()
            if not any(sub.iterdir()):
                sub.rmdir()


# ---------------------------------------------------------------------------------------------------------
# Manifest and the whole build.


def read_manifest(out_dir: Path) -> dict[str, Any] | None:
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def manifest_is_complete(manifest: dict[str, Any], out_dir: Path) -> bool:
    """Every shard the manifest lists is on disk with the size it recorded."""
    for b in manifest["buckets"].values():
        for s in b["shards"]:
            path = Path(out_dir) / s["shard"]
            if not path.is_file() or path.stat().st_size != s["bytes"]:
                return False
    return True


def _write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


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
    old = read_manifest(out_dir)
    if old is not None and old.get("selection_hash") == digest and manifest_is_complete(old, out_dir):
        _remove_temporaries(out_dir)
        return BuildResult("unchanged", old)
    if old is not None and old.get("selection_hash") != digest and not overwrite:
        raise OutputConflictError(
            f"{out_dir} holds shards of another selection ({old.get('where')!r}, {old.get('samples')} samples);"
            f" expected an empty folder or the same selection. Replace them with overwrite=True"
            " (jobs.shards --overwrite) or pick another output."
        )
    (out_dir / MANIFEST).unlink(missing_ok=True)  # the old manifest no longer describes the folder
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

    by_name = {c.bucket.name: c.bucket for c in plan.clips}
    manifest_buckets: dict[str, Any] = {}
    for info in infos:
        b = by_name[info.bucket]
        entry = manifest_buckets.setdefault(info.bucket, {
            "frames": b.frames, "height": b.height, "width": b.width, "fps": b.fps, "samples": 0, "shards": [],
        })
        entry["samples"] += info.samples
        entry["shards"].append({"shard": info.shard, "samples": info.samples, "bytes": info.bytes})
    manifest = {
        "version": SHARDS_VERSION,
        "selection_hash": digest,
        "where": where,
        "buckets_config": asdict(buckets),
        "shards_config": asdict(shards),
        "selected": len(plan.clips) + len(plan.skipped),
        "samples": sum(i.samples for i in infos),
        "shards": len(infos),
        "buckets": manifest_buckets,
        "skipped": [{"clip_id": c, "reason": r} for c, r in plan.skipped],
        "errors": [{"clip_id": c, "error": e} for c, e in errors],
    }
    manifest = json.loads(json.dumps(manifest, default=str))  # the same plain JSON a later read returns
    _write_json_atomic(out_dir / MANIFEST, manifest)
    return BuildResult("written", manifest, errors)


def _remove_temporaries(out_dir: Path) -> None:
    for sub in out_dir.iterdir():
        if sub.is_dir() and _BUCKET_DIR.match(sub.name):
            for f in sub.iterdir():
                if _TMP_NAME.match(f.name):
                    f.unlink()


def read_output_index(out_dir: str | Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(shards rows, shard_samples rows) of a finished output, read from its manifest and tars."""
    out_dir = Path(out_dir).resolve()
    manifest = read_manifest(out_dir)
    if manifest is None:
        raise FileNotFoundError(f"{out_dir / MANIFEST} not found: expected a finished shard output")
    shard_rows, sample_rows = [], []
    for name, b in sorted(manifest["buckets"].items()):
        for s in b["shards"]:
            n = 0
            with tarfile.open(out_dir / s["shard"]) as tar:
                for member in tar:
                    if not member.name.endswith(".json"):
                        continue
                    meta = json.load(tar.extractfile(member))
                    sample_rows.append({
                        "key": member.name[: -len(".json")], "clip_id": meta["clip_id"], "video_id": meta["video_id"],
                        "shard": s["shard"], "bucket": name, "output": str(out_dir),
                    })
                    n += 1
            if n != s["samples"]:
                raise SampleShapeError(f"{s['shard']}: manifest says {s['samples']} samples, the tar holds {n}")
            shard_rows.append({
                "shard": s["shard"], "bucket": name, "frames": b["frames"], "height": b["height"],
                "width": b["width"], "fps": b["fps"], "num_samples": n, "bytes": s["bytes"],
                "output": str(out_dir), "selection": manifest["where"],
            })
    return shard_rows, sample_rows
