"""Bucket assignment for training shards: which frames × height × width a clip becomes.

Pure: numbers in, a small frozen dataclass out. The bucket contract itself (names, 4k+1 frames,
sides multiples of 16, ``Bucket``) lives in ``catalog.shards``, shared with the trainer; this module
is the curation side's choice of bucket for a clip. The rules (DESIGN.md §4 "Buckets"):

- Frames are 4k+1 (the VAE compresses time 4× keeping the first frame apart); images are
  1-frame samples. A video clip goes to the *largest* frame bucket it can fill at the bucket
  fps, where bucket frame ``i`` is the source frame nearest to time ``i / fps`` after the
  clip's start (see ``source_frame_indices``).
- Height and width are multiples of 16 (8× VAE downsampling, then 2×2 patches), taken from a
  configurable resolution table. The aspect is chosen first: the table entries whose aspect is
  nearest the clip's display aspect by log-ratio (within ``aspect_tolerance`` of the best).
  Among those, the largest one the clip can fill without upscaling more than ``max_upscale``.
  Aspect is decided before size so a small clip keeps its shape rather than jumping to a
  different aspect at a bigger size.
- The picture is centre-cropped to the bucket aspect and then resized; it is never stretched.

Upscaling limit: ``max_upscale`` (default 1.1) bounds how much a crop may be enlarged to
reach the bucket. A little enlargement keeps 320×180 footage in the 256² tier (it needs 1.05×); more would
teach the model blurred pixels, so such a clip gets no bucket (with a reason) instead.

A source whose frame rate is below the bucket fps gets no bucket either: reaching the bucket
fps would repeat frames, which teaches the model stutter.

Frame strides (CogVideo's multi-frame-rate training): ``strides`` lists, per frame bucket, the strides its
samples are written at (default 1 only). Stride s takes every s-th frame of the clip resampled to ``fps``,
so the sample's frame rate is fps / s and it spans s times as long; bucket frame i is then the source frame
nearest i·s / fps, i.e. exactly stride-1 frame i·s. Each stride is assigned on its own: the largest frame
bucket that lists it and that the clip can fill at fps / s (same resolution rule), so a clip too short for
its stride-1 bucket at stride 2 lands in a smaller one, or gets no stride-2 sample.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from catalog.shards import Bucket, BucketError, is_frame_count
from catalog.shards import parse_size as parse_bucket_size

# 256² tier and a 480×720-area tier (CogVideoX's training area), at 9:16, 3:4, 1:1, 4:3,
# 16:9 and ~3:1; sides rounded to multiples of 16, so aspects are approximate.
DEFAULT_RESOLUTIONS: tuple[str, ...] = (
    "336x192", "288x224", "256x256", "224x288", "192x336", "144x448",
    "784x448", "672x512", "592x592", "512x672", "448x784", "336x1024",
)


class BucketConfigError(BucketError):
    """A bucket table or frame list breaks the 4k+1 / multiple-of-16 rules."""


@dataclass(frozen=True, kw_only=True, slots=True)
class BucketConfig:
    """TOML section ``[buckets]``."""

    frames: tuple[int, ...] = (1, 17, 49, 81, 161)
    """Frame buckets, each 4k+1. 1 is the image bucket; leave it out to drop images."""
    fps: float = 8.0
    """Frame rate every video sample is resampled to."""
    resolutions: tuple[str, ...] = DEFAULT_RESOLUTIONS
    """Resolution × aspect table as "HxW" strings, both multiples of 16."""
    max_upscale: float = 1.1
    """Largest allowed enlargement of the centre crop to reach the bucket size."""
    aspect_tolerance: float = 0.05
    """Table entries within this log-ratio of the nearest aspect count as that aspect."""
    strides: dict[str, tuple[int, ...]] = field(default_factory=dict)
    """Frame strides per frame bucket, keyed by its frame count: ``{"17" = [1, 2]}`` writes every clip that
    fits the 17-frame bucket at 8 fps and at 4 fps (fps / stride). A bucket not named takes stride 1 only; the
    image bucket takes only 1 (a still has no frame rate)."""

    def __post_init__(self) -> None:
        if not self.frames:
            raise BucketConfigError("buckets.frames: expected at least one frame count, got none")
        for f in self.frames:
            if not is_frame_count(f):
                raise BucketConfigError(f"buckets.frames: expected counts of the form 4k+1 (1, 17, 49, ...), got {f!r}")
        if len(set(self.frames)) != len(self.frames):
            raise BucketConfigError(f"buckets.frames: expected distinct counts, got {list(self.frames)}")
        if not self.fps > 0:
            raise BucketConfigError(f"buckets.fps: expected a positive frame rate, got {self.fps!r}")
        if not self.max_upscale >= 1.0:
            raise BucketConfigError(f"buckets.max_upscale: expected >= 1.0, got {self.max_upscale!r}")
        if not self.aspect_tolerance >= 0.0:
            raise BucketConfigError(f"buckets.aspect_tolerance: expected >= 0, got {self.aspect_tolerance!r}")
        if not self.resolutions:
            raise BucketConfigError("buckets.resolutions: expected at least one HxW entry, got none")
        sizes = [parse_size(r) for r in self.resolutions]
        if len(set(sizes)) != len(sizes):
            raise BucketConfigError(f"buckets.resolutions: expected distinct entries, got {list(self.resolutions)}")
        for key, strides in self.strides.items():
            if not (key.isdigit() and int(key) in self.frames):
                raise BucketConfigError(f"buckets.strides: expected keys naming frame buckets of buckets.frames "
                                        f"{[str(f) for f in self.frames]}, got {key!r}")
            if not strides or len(set(strides)) != len(strides) or any(
                    not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in strides):
                raise BucketConfigError(f"buckets.strides.{key}: expected distinct strides >= 1, got {list(strides)}")
            if int(key) == 1 and tuple(strides) != (1,):
                raise BucketConfigError(f"buckets.strides.1: the image bucket has no frame rate to stride, expected "
                                        f"[1], got {list(strides)}")

    def strides_for(self, frames: int) -> tuple[int, ...]:
        """The strides the ``frames`` bucket is written at, ascending."""
        return tuple(sorted(self.strides.get(str(frames), (1,))))

    @property
    def all_strides(self) -> tuple[int, ...]:
        """Every stride some video bucket is written at, ascending (1 first when any bucket takes it)."""
        return tuple(sorted({s for f in self.frames if f > 1 for s in self.strides_for(f)}))

    @property
    def sizes(self) -> tuple[tuple[int, int], ...]:
        """The resolution table as (height, width) pairs."""
        return tuple(parse_size(r) for r in self.resolutions)


def parse_size(text: str) -> tuple[int, int]:
    """"HxW" -> (height, width); both must be positive multiples of 16."""
    try:
        return parse_bucket_size(text)
    except BucketError as err:
        raise BucketConfigError(f"buckets.resolutions: {err}") from err


def source_frame_indices(out_frames: int, src_fps: float, bucket_fps: float) -> np.ndarray:
    """Source frame (0-based from the clip start) nearest to each bucket timestamp i / bucket_fps.

    Source frame k is shown at k / src_fps, so bucket frame i takes round(i * src_fps / bucket_fps).
    """
    if out_frames < 1 or not src_fps > 0 or not bucket_fps > 0:
        raise ValueError(f"expected out_frames >= 1 and positive rates, got {out_frames}, {src_fps}, {bucket_fps}")
    # floor(x + 0.5) rather than np.round: banker's rounding would make ties depend on parity.
    return np.floor(np.arange(out_frames) * (src_fps / bucket_fps) + 0.5).astype(np.int64)


def fillable_frames(clip_frames: int, src_fps: float, bucket_fps: float) -> int:
    """How many bucket frames a clip of ``clip_frames`` source frames can supply."""
    if clip_frames < 1:
        return 0
    step = src_fps / bucket_fps
    # Largest i with floor(i * step + 0.5) <= clip_frames - 1.
    n = math.floor((clip_frames - 0.5) / step) + 1
    while n > 1 and source_frame_indices(n, src_fps, bucket_fps)[-1] > clip_frames - 1:
        n -= 1  # guards the float edge where (clip_frames - 0.5) / step lands just above an integer
    return n


def crop_box(width: int, height: int, bucket: Bucket) -> tuple[int, int, int, int]:
    """Centre crop ``(x0, y0, x1, y1)`` of a width × height picture to the bucket's aspect."""
    target = bucket.width / bucket.height
    if width / height > target:
        cw, ch = min(width, round(height * target)), height
    else:
        cw, ch = width, min(height, round(width / target))
    x0 = (width - cw) // 2
    y0 = (height - ch) // 2
    return x0, y0, x0 + cw, y0 + ch


def explain_bucket(
    frames: int, fps: float, width: int, height: int, is_image: bool, cfg: BucketConfig, stride: int = 1
) -> tuple[Bucket | None, str]:
    """The bucket for a clip at frame ``stride``, or None and why it fits none. Sizes are display sizes.

    The bucket's ``fps`` is the sample's own rate, ``cfg.fps / stride`` (0 for an image).
    """
    if width is None or height is None or width < 1 or height < 1:
        return None, f"no display size (got {width}x{height})"
    if is_image:
        if 1 not in cfg.frames:
            return None, "image, but the frame list has no 1-frame bucket"
        if stride != 1:
            return None, f"image: stride {stride} (a still has no frame rate)"
        n_frames, bucket_fps = 1, 0.0
    else:
        video_buckets = sorted((f for f in cfg.frames if f > 1 and stride in cfg.strides_for(f)), reverse=True)
        if not video_buckets:
            if not any(f > 1 for f in cfg.frames):
                return None, "video, but the frame list has only the 1-frame bucket"
            return None, f"no frame bucket is written at stride {stride} (buckets.strides)"
        if fps is None or not fps > 0:
            return None, f"no source frame rate (got {fps})"
        rate = cfg.fps / stride
        if fps < rate * 0.99:
            return None, f"source {fps:.3g} fps is below the bucket {rate:.3g} fps"
        available = fillable_frames(int(frames or 0), fps, rate)
        fits = [f for f in video_buckets if f <= available]
        if not fits:
            at = f" (stride {stride})" if stride != 1 else ""
            return None, (
                f"too short: {frames} frames at {fps:.3g} fps give {available} at {rate:.3g} fps{at},"
                f" smallest bucket needs {video_buckets[-1]}"
            )
        n_frames, bucket_fps = fits[0], rate

    aspect = math.log(width / height)
    distance = {hw: abs(math.log(hw[1] / hw[0]) - aspect) for hw in cfg.sizes}
    best = min(distance.values())
    same_aspect = [hw for hw in cfg.sizes if distance[hw] <= best + cfg.aspect_tolerance]
    fillable = []
    for h, w in same_aspect:
        x0, y0, x1, y1 = crop_box(width, height, Bucket(n_frames, h, w, bucket_fps))
        if max(h / (y1 - y0), w / (x1 - x0)) <= cfg.max_upscale:
            fillable.append((h * w, h, w))
    if not fillable:
        smallest = min(same_aspect, key=lambda hw: hw[0] * hw[1])
        return None, (
            f"too small: {width}x{height} would need more than {cfg.max_upscale}x upscaling"
            f" to reach {smallest[0]}x{smallest[1]}"
        )
    _, h, w = max(fillable)
    return Bucket(n_frames, h, w, bucket_fps), ""


def assign_bucket(
    frames: int, fps: float, width: int, height: int, is_image: bool, cfg: BucketConfig, stride: int = 1
) -> Bucket | None:
    """The bucket for a clip at ``stride``, or None when it fits none (``explain_bucket`` says why)."""
    return explain_bucket(frames, fps, width, height, is_image, cfg, stride)[0]
