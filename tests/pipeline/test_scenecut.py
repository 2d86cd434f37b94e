"""Scene cut: synthetic videos with hard cuts at known frames, real footage joined at known frames, clip limits."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from catalog.config import ConfigError, from_dict
from pipeline.scenecut import CutDetector, SceneCutConfig, clip_spans, detect_cuts

MEDIA = Path(__file__).resolve().parents[2] / ".." / "shared" / "media"
FPS = 24.0


def panning_scene(seed: int, n: int, h: int = 192, w: int = 320, tint: tuple[float, float, float] = (1, 1, 1)) -> list[np.ndarray]:
    """A smooth random texture panning 2 px per frame: steady motion, no cut inside."""
    rng = np.random.default_rng(seed)
    base = cv2.resize(rng.integers(0, 256, (h // 12, (w + 2 * n) // 12, 3), dtype=np.uint8), (w + 2 * n, h), interpolation=cv2.INTER_CUBIC)
    base = np.clip(base * np.asarray(tint), 0, 255).astype(np.uint8)
    return [np.ascontiguousarray(base[:, 2 * t : 2 * t + w]) for t in range(n)]


def join(*scenes: list[np.ndarray]) -> tuple[list[np.ndarray], list[int]]:
    frames: list[np.ndarray] = []
    cuts = []
    for s in scenes:
        if frames:
            cuts.append(len(frames))
        frames += s
    return frames, cuts


@pytest.fixture(scope="module")
def four_scenes() -> tuple[list[np.ndarray], list[int]]:
    return join(panning_scene(1, 50), panning_scene(2, 31), panning_scene(3, 66), panning_scene(4, 40))


def assert_cuts_match(found: list[int], truth: list[int]) -> None:
    assert len(found) == len(truth), f"found cuts {found}, expected {truth}"
    for f, t in zip(found, truth):
        assert abs(f - t) <= 1, f"found cuts {found}, expected {truth}"


@pytest.mark.parametrize("detector", ["adaptive", "content"])
@pytest.mark.parametrize("luma_only", [False, True])
def test_hard_cuts_found_at_their_frames(four_scenes, detector: str, luma_only: bool) -> None:
    frames, truth = four_scenes
    cuts = detect_cuts(frames, FPS, SceneCutConfig(detector=detector, luma_only=luma_only))
    assert_cuts_match(cuts, truth)


@pytest.mark.parametrize("detector", ["adaptive", "content"])
def test_single_shot_has_no_cuts(detector: str) -> None:
    assert detect_cuts(panning_scene(7, 90), FPS, SceneCutConfig(detector=detector)) == []


@pytest.mark.parametrize("detector", ["adaptive", "content"])
def test_luma_only_ignores_a_change_of_colour_alone(detector: str) -> None:
    # Same texture, red then blue: HSV value (PySceneDetect's luma) equal, hue jumps by 120.
    # One continuous pan, only the colour changes at frame 40.
    red = [np.ascontiguousarray(f[..., [0, 0, 0]] * np.array([1, 0, 0], np.uint8)) for f in panning_scene(5, 80)]
    red, blue = red[:40], [np.ascontiguousarray(f[..., ::-1]) for f in red[40:]]
    frames, truth = join(red, blue)
    assert_cuts_match(detect_cuts(frames, FPS, SceneCutConfig(detector=detector)), truth)
    assert detect_cuts(frames, FPS, SceneCutConfig(detector=detector, luma_only=True)) == []


def test_cut_in_the_last_frames_is_flushed() -> None:
    # The adaptive detector judges frame i only after seeing two more; finish() must still judge the
    # last frames (a cut two frames before the end would otherwise never be reported).
    frames, truth = join(panning_scene(1, 40), panning_scene(2, 2))
    assert_cuts_match(detect_cuts(frames, FPS, SceneCutConfig()), truth)
    assert_cuts_match(detect_cuts(frames, FPS, SceneCutConfig(detector="content")), truth)


def test_cuts_closer_than_min_scene_are_not_reported_twice() -> None:
    frames, _ = join(panning_scene(1, 40), panning_scene(2, 3), panning_scene(3, 40))
    cuts = detect_cuts(frames, FPS, SceneCutConfig(min_scene_s=0.6))
    assert len(cuts) == 1 and 39 <= cuts[0] <= 44, cuts


def test_detector_streams_with_frame_numbers_and_names_itself(four_scenes) -> None:
    frames, truth = four_scenes
    det = CutDetector(SceneCutConfig(detector="adaptive", detect_width=96), FPS)
    for i, f in enumerate(frames):
        det.push(i, f)
    assert_cuts_match(det.finish(), truth)
    assert det.name == "adaptive(t=3.0,min=15.0,len=0.0s,luma=auto:False,w=96)+fades(black<12.0)"
    with pytest.raises(RuntimeError, match="after finish"):
        det.push(len(frames), frames[0])


def test_push_rejects_bad_frames_and_order() -> None:
    det = CutDetector(SceneCutConfig(), FPS)
    det.push(0, np.zeros((32, 48, 3), np.uint8))
    with pytest.raises(ValueError, match="strictly increasing"):
        det.push(0, np.zeros((32, 48, 3), np.uint8))
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        det.push(1, np.zeros((32, 48), np.uint8))
    with pytest.raises(ValueError, match="fps"):
        CutDetector(SceneCutConfig(), 0.0)


def test_empty_and_one_frame_inputs() -> None:
    assert detect_cuts([], FPS, SceneCutConfig()) == []
    assert detect_cuts([np.zeros((8, 8, 3), np.uint8)], FPS, SceneCutConfig()) == []


def test_config_from_toml_dict_validates() -> None:
    cfg = from_dict(SceneCutConfig, {"detector": "content", "luma_only": True, "max_clip_s": 8})
    assert cfg.detector == "content" and cfg.max_clip_s == 8.0
    with pytest.raises(ConfigError, match=r"'adaptive', 'content'.*'hash'"):
        SceneCutConfig(detector="hash")
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(SceneCutConfig, {"treshold": 3})
    with pytest.raises(ConfigError, match="min_clip_s"):
        SceneCutConfig(min_clip_s=5, max_clip_s=4)


# ---- clip_spans (24 fps: trim 0.25 s = 6 frames, min 2 s = 48, max 10 s = 240) ----

CFG = SceneCutConfig()


def test_spans_trim_both_ends_of_each_scene() -> None:
    assert clip_spans([100], 200, FPS, CFG) == [(6, 94), (106, 194)]


def test_spans_drop_scenes_short_after_trimming() -> None:
    # [0,59) trims to 47 frames < 48: dropped; [59,119) trims to 48: kept.
    assert clip_spans([59, 119], 300, FPS, CFG) == [(65, 113), (125, 294)]


def test_spans_split_long_scene_into_equal_pieces() -> None:
    spans = clip_spans([], 24 * 25, FPS, CFG)  # one 25 s scene, 24.5 s after trimming
    assert len(spans) == 3
    lengths = [e - s for s, e in spans]
    assert max(lengths) - min(lengths) <= 1 and all(48 <= n <= 240 for n in lengths)
    assert spans[0][0] == 6 and spans[-1][1] == 600 - 6
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:])), "pieces of one scene are contiguous"


def test_spans_scene_just_over_max_is_split_in_two() -> None:
    spans = clip_spans([], 241 + 12, FPS, CFG)
    assert [e - s for s, e in spans] == [120, 121]


def test_spans_no_cuts_short_video_is_one_clip() -> None:
    assert clip_spans([], 120, FPS, CFG) == [(6, 114)]


def test_spans_one_frame_and_empty_inputs() -> None:
    assert clip_spans([], 1, FPS, CFG) == []
    assert clip_spans([], 0, FPS, CFG) == []


def test_spans_ignore_out_of_range_and_duplicate_cuts() -> None:
    assert clip_spans([0, 100, 100, 250], 200, FPS, CFG) == [(6, 94), (106, 194)]


def test_spans_when_no_equal_split_fits_take_max_pieces() -> None:
    cfg = SceneCutConfig(trim_s=0, min_clip_s=5, max_clip_s=5)
    assert clip_spans([], 24 * 12, FPS, cfg) == [(0, 120), (120, 240)]


def test_spans_ntsc_rate_limits_are_whole_frames() -> None:
    fps = 30000 / 1001
    spans = clip_spans([], 10_000, fps, CFG)
    assert all(60 <= e - s <= 299 for s, e in spans)


# ---- real footage joined at known frames ----


def _decode(path: Path, n: int, size: tuple[int, int]) -> list[np.ndarray]:
    av = pytest.importorskip("av")
    out = []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            out.append(cv2.resize(frame.to_ndarray(format="rgb24"), size, interpolation=cv2.INTER_AREA))
            if len(out) == n:
                break
    return out


@pytest.mark.media
@pytest.mark.skipif(not MEDIA.is_dir(), reason="needs ../shared/media")
@pytest.mark.parametrize("detector", ["adaptive", "content"])
def test_real_footage_joined_cuts_found(detector: str) -> None:
    size = (320, 180)
    parts = [
        _decode(MEDIA / "stream-of-water.webm", 60, size),  # handheld shake
        _decode(MEDIA / "friday.mp4", 70, size),  # black-and-white film grain
        _decode(MEDIA / "flower.webm", 50, size),
        _decode(MEDIA / "bottle-detection.mp4", 40, size),
    ]
    frames, truth = join(*parts)
    assert_cuts_match(detect_cuts(frames, 30.0, SceneCutConfig(detector=detector)), truth)
    assert detect_cuts(_decode(MEDIA / "friday.mp4", 180, size), 30.0, SceneCutConfig(detector=detector, luma_only=True)) == []


def faded(scene: list[np.ndarray], fade_in: int = 0, fade_out: int = 0) -> list[np.ndarray]:
    n = len(scene)
    out = []
    for i, f in enumerate(scene):
        a = min(1.0, (i + 1) / (fade_in + 1) if fade_in else 1.0, (n - i) / (fade_out + 1) if fade_out else 1.0)
        out.append((f * a).round().astype(np.uint8))
    return out


def test_fade_through_black_is_one_boundary_cut_out_of_the_clips() -> None:
    black = [np.zeros_like(panning_scene(1, 1)[0])] * 6
    a, b = faded(panning_scene(1, 60), fade_out=12), faded(panning_scene(2, 60), fade_in=12)
    frames = a + black + b
    cfg = SceneCutConfig()
    det = CutDetector(cfg, FPS)
    for i, f in enumerate(frames):
        det.push(i, f)
    cuts = det.finish()
    assert cuts == [63], cuts  # the middle of the six black frames 60..65
    (t,) = det.transitions
    assert 45 <= t.start <= 49 and t.black_start <= 60 and t.black_end >= 66 and 76 <= t.end <= 80, t
    # The scene before ends where the fade-out starts, the next starts where the fade-in has settled.
    assert det.boundaries_so_far == [(t.start, t.end)]


def _first_seen(frames: list[np.ndarray]) -> tuple[CutDetector, dict[tuple[int, int], int]]:
    """Stream ``frames``; the frame after which each boundary first showed in ``boundaries_so_far``."""
    det = CutDetector(SceneCutConfig(), FPS)
    seen: dict[tuple[int, int], int] = {}
    for i, f in enumerate(frames):
        det.push(i, f)
        for b in det.boundaries_so_far:
            seen.setdefault(b, i)
    det.finish()
    return det, seen


def test_a_hard_cut_is_final_as_soon_as_no_fade_can_start_at_it() -> None:
    # The clips before a cut are scored once it is final: a few frames after it when the next scene does not darken,
    # not max_fade_s (2 s, 48 frames here) later.
    frames, truth = join(panning_scene(1, 80), panning_scene(2, 120))
    det, seen = _first_seen(frames)
    assert det.boundaries_so_far == [(80, 80)]
    assert seen[(80, 80)] <= 80 + 6, seen


def test_a_cut_into_a_fade_out_waits_and_is_absorbed_by_it() -> None:
    black = [np.zeros_like(panning_scene(1, 1)[0])] * 6
    frames = panning_scene(1, 60) + faded(panning_scene(2, 14), fade_out=12) + black + faded(panning_scene(3, 60), fade_in=12)
    det, seen = _first_seen(frames)
    (t,) = det.transitions
    assert 60 <= t.start <= 62, t  # the fade-out starts right at the cut to its scene ...
    assert det.boundaries_so_far == [(t.start, t.end)], det.boundaries_so_far  # ... which is its edge, not a cut


def test_black_at_start_and_end_is_no_cut() -> None:
    black = [np.zeros_like(panning_scene(1, 1)[0])] * 10
    frames = black + faded(panning_scene(1, 60), fade_in=8, fade_out=8) + black
    det = CutDetector(SceneCutConfig(), FPS)
    for i, f in enumerate(frames):
        det.push(i, f)
    assert det.finish() == []
    first, last = det.transitions
    assert first.start == 0 and 17 <= first.end <= 20, first
    assert 60 <= last.start <= 63 and last.end == len(frames), last
    assert not det.all_black


def test_grayscale_footage_switches_to_luma_only_and_is_reported() -> None:
    gray = lambda s: [np.repeat(cv2.cvtColor(f, cv2.COLOR_RGB2GRAY)[..., None], 3, axis=2) for f in s]  # noqa: E731
    frames, truth = join(gray(panning_scene(1, 50)), gray(panning_scene(2, 40)))
    det = CutDetector(SceneCutConfig(), FPS)
    for i, f in enumerate(frames):
        det.push(i, f)
    assert_cuts_match(det.finish(), truth)
    assert det.is_grayscale and det.luma_only and "luma=auto:True" in det.name
    colour = CutDetector(SceneCutConfig(), FPS)
    for i, f in enumerate(panning_scene(3, 30)):
        colour.push(i, f)
    colour.finish()
    assert not colour.is_grayscale and colour.luma_only is False


def test_every_cut_of_fast_cut_footage_is_recorded() -> None:
    # 0.3 s shots: the default records each cut; the 2 s clip minimum, not the detector, drops such shots.
    frames, truth = join(*[panning_scene(k, 7) for k in range(1, 8)], panning_scene(9, 40))
    assert_cuts_match(detect_cuts(frames, FPS, SceneCutConfig()), truth)


@pytest.mark.media
@pytest.mark.skipif(not MEDIA.is_dir(), reason="needs ../shared/media")
@pytest.mark.parametrize("luma_only", [False, True])
def test_frame_scores_and_cuts_equal_pyscenedetects_own_bit_for_bit(luma_only: bool) -> None:
    """The faster frame score (pipeline.scenecut._ExactScore) is PySceneDetect's, not an approximation:
    every frame's score and every cut equal the stock detectors' on real footage joined with hard cuts."""
    from scenedetect import FrameTimecode
    from scenedetect.detectors import AdaptiveDetector, ContentDetector

    from pipeline.scenecut import _Adaptive, _Content

    size = (160, 90)
    frames, truth = join(_decode(MEDIA / "stream-of-water.webm", 60, size), _decode(MEDIA / "friday.mp4", 50, size),
                         _decode(MEDIA / "flower.webm", 50, size), panning_scene(5, 30, 90, 160))
    pairs = [(_Adaptive(luma_only=luma_only), AdaptiveDetector(luma_only=luma_only)),
             (_Content(luma_only=luma_only), ContentDetector(luma_only=luma_only))]
    for ours, stock in pairs:
        cuts_ours, cuts_stock = [], []
        for i, rgb in enumerate(frames):
            bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
            cuts_ours += [t.frame_num for t in ours.process_frame(FrameTimecode(i, FPS), bgr)]
            cuts_stock += [t.frame_num for t in stock.process_frame(FrameTimecode(i, FPS), bgr)]
            assert ours._frame_score == stock._frame_score, (type(stock).__name__, i)
        assert cuts_ours == cuts_stock
    assert_cuts_match(cuts_ours, truth)  # the content detector found the joins (sanity: the frames are real cuts)
    # The adaptive detector's timecode-free path (what CutDetector calls) gives the stock detector's cuts, with
    # PySceneDetect's default minimum scene length and with the product's (every cut recorded).
    for min_len in (15, 1):
        ours, stock = _Adaptive(luma_only=luma_only, min_scene_len=min_len), \
            AdaptiveDetector(luma_only=luma_only, min_scene_len=min_len)
        cuts_ours, cuts_stock = [], []
        for i, rgb in enumerate(frames):
            bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
            cuts_ours += ours.process(i, bgr)
            cuts_stock += [t.frame_num for t in stock.process_frame(FrameTimecode(i, FPS), bgr)]
        assert cuts_ours == cuts_stock, min_len
        assert_cuts_match(cuts_ours, truth)
