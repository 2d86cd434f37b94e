from __future__ import annotations

import math

import pytest

from catalog.config import ConfigError, from_dict
from catalog.shards import Bucket
from pipeline.buckets import (
    BucketConfig,
    BucketConfigError,
    assign_bucket,
    crop_box,
    explain_bucket,
    fillable_frames,
    source_frame_indices,
)

CFG = BucketConfig()


def _no_stretch(width: int, height: int, bucket: Bucket) -> None:
    x0, y0, x1, y1 = crop_box(width, height, bucket)
    assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
    sx, sy = bucket.width / (x1 - x0), bucket.height / (y1 - y0)
    # Integer crop sides allow at most one pixel of disagreement between the two scales.
    assert abs(sx - sy) <= max(sx, sy) / min(x1 - x0, y1 - y0), (width, height, bucket, (x0, y0, x1, y1))


@pytest.mark.parametrize(
    ("width", "height", "is_image", "expected"),
    [
        (1244, 416, True, "1x336x1024"),    # leopard.jpg, 3:1
        (1721, 1721, True, "1x592x592"),    # ice-cream.jpg, square
        (360, 640, False, "161x336x192"),   # portrait phone video
        (1920, 1080, False, "161x448x784"),
        (320, 192, False, "161x192x336"),   # 5:3 is nearer 16:9 than 4:3
        (480, 360, False, "161x224x288"),
    ],
)
def test_aspect_cases_land_in_sensible_buckets(width, height, is_image, expected):
    bucket = assign_bucket(2000, 30.0, width, height, is_image, CFG)
    assert bucket is not None and bucket.name == expected
    assert bucket.height % 16 == 0 and bucket.width % 16 == 0
    bucket_aspect, source_aspect = bucket.width / bucket.height, width / height
    others = [w / h for h, w in CFG.sizes]
    assert abs(math.log(bucket_aspect / source_aspect)) <= min(abs(math.log(a / source_aspect)) for a in others) + CFG.aspect_tolerance
    _no_stretch(width, height, bucket)


def test_crop_box_is_centred_and_full_in_one_direction():
    assert crop_box(1244, 416, Bucket(1, 256, 256, 0.0)) == (414, 0, 830, 416)
    assert crop_box(360, 640, Bucket(17, 256, 256, 8.0)) == (0, 140, 360, 500)
    # 192x336 is 1.75, a little narrower than 16:9, so a sliver comes off each side.
    assert crop_box(1920, 1080, Bucket(17, 192, 336, 8.0)) == (15, 0, 1905, 1080)


def test_largest_frame_bucket_the_clip_fills():
    # 30 fps source, 8 fps buckets: 49 bucket frames reach source frame round(48 * 3.75) = 180.
    assert assign_bucket(181, 30.0, 640, 360, False, CFG).frames == 49
    assert assign_bucket(180, 30.0, 640, 360, False, CFG).frames == 17
    assert fillable_frames(181, 30.0, 8.0) == 49
    assert fillable_frames(180, 30.0, 8.0) == 48
    bucket, reason = explain_bucket(40, 30.0, 640, 360, False, CFG)
    assert bucket is None and "too short" in reason and "17" in reason


def test_source_frame_indices_are_nearest_and_inside_the_clip():
    idx = source_frame_indices(17, 24.0, 8.0)
    assert idx.tolist() == [3 * i for i in range(17)]
    idx = source_frame_indices(49, 29.97, 8.0)
    assert idx[0] == 0 and all(abs(k - i * 29.97 / 8) <= 0.5 for i, k in enumerate(idx))
    for n in range(1, 400):
        k = fillable_frames(n, 29.97, 8.0)
        assert source_frame_indices(k, 29.97, 8.0)[-1] <= n - 1
        assert source_frame_indices(k + 1, 29.97, 8.0)[-1] > n - 1


def test_no_bucket_reasons():
    assert explain_bucket(500, 5.0, 640, 360, False, CFG) == (None, "source 5 fps is below the bucket 8 fps")
    bucket, reason = explain_bucket(500, 30.0, 160, 90, False, CFG)
    assert bucket is None and "too small" in reason
    no_images = BucketConfig(frames=(17, 49))
    bucket, reason = explain_bucket(1, 0.0, 640, 640, True, no_images)
    assert bucket is None and "image" in reason


def test_upscale_limit_is_configurable():
    assert assign_bucket(700, 30.0, 240, 240, False, BucketConfig(max_upscale=1.0)) is None
    small_tier = BucketConfig(max_upscale=1.0, resolutions=("256x256", "128x128"))
    assert assign_bucket(700, 30.0, 240, 240, False, small_tier) == Bucket(161, 128, 128, 8.0)
    assert assign_bucket(700, 30.0, 240, 240, False, BucketConfig(max_upscale=1.1)) == Bucket(161, 256, 256, 8.0)
    # 360 px wide portrait would need 1.24x for the 784x448 tier: over the default limit.
    assert assign_bucket(700, 30.0, 360, 640, False, BucketConfig(max_upscale=1.25)).name == "161x784x448"


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"frames": [1, 16]}, r"4k\+1"),
        ({"frames": [17, 17]}, "distinct"),
        ({"resolutions": ["250x256"]}, "multiples of 16"),
        ({"resolutions": ["256"]}, "HxW"),
        ({"fps": 0}, "positive"),
        ({"max_upscale": 0.5}, ">= 1.0"),
    ],
)
def test_config_validation_names_the_problem(data, fragment):
    with pytest.raises(BucketConfigError, match=fragment):
        from_dict(BucketConfig, data, where="buckets")


def test_unknown_key_is_an_error():
    with pytest.raises(ConfigError, match="framez"):
        from_dict(BucketConfig, {"framez": [17]}, where="buckets")


def test_strides_config_from_toml_table_and_its_errors():
    cfg = from_dict(BucketConfig, {"frames": [1, 17, 49], "strides": {"17": [1, 2], "49": [2, 4]}}, where="buckets")
    assert cfg.strides_for(17) == (1, 2) and cfg.strides_for(49) == (2, 4) and cfg.strides_for(1) == (1,)
    assert cfg.all_strides == (1, 2, 4) and BucketConfig().all_strides == (1,)
    for strides, fragment in [({"33": [1, 2]}, "expected keys naming frame buckets"), ({"17": []}, "distinct strides"),
                              ({"17": [2, 2]}, "distinct strides"), ({"17": [0]}, "distinct strides"),
                              ({"1": [1, 2]}, "image bucket has no frame rate")]:
        with pytest.raises(BucketConfigError, match=fragment):
            BucketConfig(frames=(1, 17), strides=strides)
    with pytest.raises(ConfigError, match=r"buckets.strides.17\[0\]: expected int"):
        from_dict(BucketConfig, {"strides": {"17": ["2"]}}, where="buckets")


def test_each_stride_takes_the_largest_bucket_listing_it_at_fps_over_stride():
    cfg = BucketConfig(frames=(1, 17, 49), strides={"17": [1, 2], "49": [1, 2]})
    # 200 source frames at 24 fps: 67 frames at 8 fps (49 bucket), 34 at 4 fps (17 bucket).
    assert fillable_frames(200, 24.0, 8.0) == 67 and fillable_frames(200, 24.0, 4.0) == 34
    assert explain_bucket(200, 24.0, 480, 360, False, cfg, 1)[0] == Bucket(49, 224, 288, 8.0)
    assert explain_bucket(200, 24.0, 480, 360, False, cfg, 2)[0] == Bucket(17, 224, 288, 4.0)
    # A stride-s frame i is the stride-1 frame i*s: the same source frame, half the rate, twice the span.
    assert list(source_frame_indices(17, 24.0, 4.0)) == list(source_frame_indices(33, 24.0, 8.0)[::2])
    bucket, reason = explain_bucket(90, 24.0, 480, 360, False, cfg, 2)  # 17 frames at 4 fps need 97 source frames
    assert bucket is None and reason.startswith("too short") and "(stride 2)" in reason
    assert explain_bucket(200, 24.0, 480, 360, False, cfg, 3)[1] == "no frame bucket is written at stride 3 (buckets.strides)"
    # A 6 fps source is below 8 fps (no stride-1 sample) but not below 4 fps.
    assert explain_bucket(200, 6.0, 480, 360, False, cfg, 1)[0] is None
    assert explain_bucket(200, 6.0, 480, 360, False, cfg, 2)[0] == Bucket(49, 224, 288, 4.0)
    assert explain_bucket(1, None, 480, 360, True, cfg, 2)[1] == "image: stride 2 (a still has no frame rate)"
