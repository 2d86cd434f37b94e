"""The built-in sample: deterministic bytes, and content that really has the ground truth it claims."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from pipeline.media import open_frames, probe
from pipeline.sample import (BAD_INPUT_ERRORS, DEFOCUS_SIGMA, TRUTH_FILE, SampleTruth, generate_sample, load_truth,
                             write_bad_inputs)


def _luma(sample_dir, name) -> np.ndarray:
    path = sample_dir / name
    frames = np.stack([rgb for _, rgb in open_frames(path, probe(path))]).astype(np.float32)
    return frames.mean(axis=-1)  # (T, H, W)


def _static_pixels(luma: np.ndarray) -> np.ndarray:
    """Pixels whose value barely changes while the rest of the picture moves: overlay evidence."""
    std = luma.std(axis=0)
    return std < 0.5 * np.median(std)


def test_generate_is_deterministic_and_idempotent(sample_dir, sample_truth, tmp_path):
    again = generate_sample(tmp_path)
    assert again == sample_truth
    names = sorted(p.name for p in sample_dir.iterdir())
    assert names == sorted(p.name for p in tmp_path.iterdir())
    assert set(names) == {it.file for it in sample_truth.items} | {TRUTH_FILE}
    for name in names:
        assert (tmp_path / name).read_bytes() == (sample_dir / name).read_bytes(), f"{name} differs run to run"

    stamps = {name: (tmp_path / name).stat().st_mtime_ns for name in names}
    (tmp_path / "static.mp4").write_bytes(b"damaged")
    generate_sample(tmp_path)
    assert (tmp_path / "static.mp4").read_bytes() == (sample_dir / "static.mp4").read_bytes()
    for name in names:
        if name != "static.mp4":
            assert (tmp_path / name).stat().st_mtime_ns == stamps[name], f"{name} was rewritten unchanged"


def test_truth_round_trips_and_names_items(sample_dir, sample_truth):
    assert load_truth(sample_dir) == sample_truth
    assert SampleTruth.from_json(sample_truth.to_json()) == sample_truth
    assert sample_truth.item("cuts") is sample_truth.item("cuts.mp4")
    assert {it.kind for it in sample_truth.items} == {"cuts", "logo", "sharp", "defocused", "static", "moving", "image"}
    with pytest.raises(KeyError, match="cuts.mp4"):
        sample_truth.item("nope")


def test_items_are_short_and_clips_survive_trimming(sample_truth):
    for item in sample_truth.items:
        if item.kind == "image":
            continue
        bounds = (0, *item.cut_frames, item.frames)
        shots = np.diff(bounds) / item.fps
        assert shots.min() >= 3.0 - 1e-9, f"{item.file}: a shot of {shots.min():.2f} s cannot keep 2 s after trims"
        assert item.frames / item.fps <= 12


def test_cuts_are_at_the_stated_frames(sample_dir, sample_truth):
    item = sample_truth.item("cuts")
    assert len(item.cut_frames) == 2
    path = sample_dir / item.file
    colour = np.stack([rgb.reshape(-1, 3).mean(0) for _, rgb in open_frames(path, probe(path))])  # (T, 3)
    jump = np.abs(np.diff(colour, axis=0)).max(axis=1)  # jump[i]: frame i -> i + 1
    at_cuts = jump[np.asarray(item.cut_frames) - 1]
    elsewhere = np.delete(jump, np.asarray(item.cut_frames) - 1)
    assert at_cuts.min() > 30, f"shots must look clearly different; mean colour jumps only {at_cuts}"
    assert elsewhere.max() < 5, f"no other frame may jump like a cut; largest {elsewhere.max():.1f}"


def test_cuts_found_by_pyscenedetect_frame_exactly(sample_dir, sample_truth):
    scenedetect = pytest.importorskip("scenedetect")
    item = sample_truth.item("cuts")
    video = scenedetect.open_video(str(sample_dir / item.file))
    manager = scenedetect.SceneManager()
    manager.add_detector(scenedetect.ContentDetector())
    manager.detect_scenes(video)
    starts = [start.frame_num for start, _ in manager.get_scene_list()]
    assert starts[1:] == list(item.cut_frames)


def test_logo_is_static_and_inside_its_box(sample_dir, sample_truth):
    item = sample_truth.item("logo")
    x0, y0, x1, y1 = item.logo_box
    assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 and x0 > 0.5 and y1 < 0.5  # top-right corner
    static = _static_pixels(_luma(sample_dir, item.file))
    h, w = static.shape
    box = np.zeros_like(static)
    box[int(y0 * h) - 2:int(np.ceil(y1 * h)) + 2, int(x0 * w) - 2:int(np.ceil(x1 * w)) + 2] = True
    assert static[box].sum() >= 200, "the logo must leave a clearly static pattern"
    assert static[~box].sum() <= 0.01 * static.sum() + 5, "static pixels outside the stated box"


@pytest.mark.parametrize("kind", ["cuts", "sharp", "defocused", "moving"])
def test_other_items_have_no_static_overlay(sample_dir, sample_truth, kind):
    item = sample_truth.item(kind)
    luma = _luma(sample_dir, item.file)
    for a, b in zip((0, *item.cut_frames), (*item.cut_frames, item.frames)):
        static = _static_pixels(luma[a:b])
        assert static.mean() < 0.002, f"{item.file} frames [{a}, {b}) hold {static.mean():.2%} static pixels"


def test_defocused_is_the_blurred_twin_of_sharp(sample_dir, sample_truth):
    assert sample_truth.item("defocused").blur_sigma == DEFOCUS_SIGMA and sample_truth.item("sharp").blur_sigma == 0
    sharp = _luma(sample_dir, "sharp.mp4")
    soft = _luma(sample_dir, "defocused.mp4")
    assert sharp.shape == soft.shape
    for s, d in zip(sharp[::8], soft[::8]):
        focus_sharp = cv2.Laplacian(s, cv2.CV_32F).var()
        focus_soft = cv2.Laplacian(d, cv2.CV_32F).var()
        assert focus_soft < 0.1 * focus_sharp
        # Same content: blurring the sharp frame gives the defocused one, up to coding noise.
        assert np.abs(cv2.GaussianBlur(s, (0, 0), DEFOCUS_SIGMA) - d).mean() < 3


def _measured_pan(luma: np.ndarray) -> np.ndarray:
    shifts = np.asarray([cv2.phaseCorrelate(luma[i], luma[i + 1])[0] for i in range(0, len(luma) - 1, 6)])
    return -shifts.mean(axis=0)  # the window pans right/down, so the picture moves left/up


def test_motion_matches_the_stated_pan(sample_dir, sample_truth):
    for kind in ("moving", "sharp", "static", "logo", "cuts"):
        item = sample_truth.item(kind)
        luma = _luma(sample_dir, item.file)
        bounds = (0, *item.cut_frames, item.frames)
        assert len(item.pans) == len(bounds) - 1
        for pan, a, b in zip(item.pans, bounds[:-1], bounds[1:]):
            measured = _measured_pan(luma[a:b])
            assert measured == pytest.approx(pan, abs=0.35), f"{item.file} [{a}, {b}): measured {measured}"
    assert sample_truth.item("moving").pan == sample_truth.item("moving").pans[0]
    with pytest.raises(ValueError, match="3 shots"):
        sample_truth.item("cuts").pan
    static = _luma(sample_dir, "static.mp4")
    assert np.abs(np.diff(static, axis=0)).mean() < 2.5, "static.mp4 may hold only sensor noise"


def test_still_image(sample_dir, sample_truth):
    item = sample_truth.item("image")
    info = probe(sample_dir / item.file)
    assert info.is_image and (info.width, info.height) == (item.width, item.height) == (384, 256)


def test_bad_inputs_are_deterministic(bad_inputs, tmp_path):
    assert set(bad_inputs) == set(BAD_INPUT_ERRORS)
    again = write_bad_inputs(tmp_path)
    for key, path in bad_inputs.items():
        assert path.exists() and again[key].read_bytes() == path.read_bytes(), key
    assert bad_inputs["empty"].stat().st_size == 0
