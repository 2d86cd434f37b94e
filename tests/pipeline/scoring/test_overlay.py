"""Static overlay: a translucent mark over changing content is found and boxed; content alone, a static
shot, noise, shake and letterbox bars are not evidence."""
from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.scoring.overlay import Overlay, static_overlay

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scoring_synthetic.py, shared by the scorer tests
from scoring_synthetic import (H, W, decode_media, handheld, iou, logo_mask, moving_object, panning,  # noqa: E402
                               static, with_logo)


def truth_box() -> tuple[float, float, float, float]:
    x, y, w, h = cv2.boundingRect((logo_mask() > 0).astype(np.uint8))
    return x / W, y / H, (x + w) / W, (y + h) / H


LOGO_FREE = {
    "pan": lambda: panning(1),
    "slow pan": lambda: panning(5, speed=(1.0, 0.3)),
    "fast pan": lambda: panning(4, speed=(20.0, 5.0)),
    "handheld shake": lambda: handheld(6),
    "moving object, static camera": lambda: moving_object(1),
    "noise": lambda: np.random.default_rng(0).integers(0, 256, (24, H, W, 3), dtype=np.uint8),
}


@pytest.mark.parametrize("name", sorted(LOGO_FREE))
def test_logo_free_content_scores_low(name: str) -> None:
    assert static_overlay(LOGO_FREE[name]()[::2]).score < 0.1


@pytest.mark.parametrize(
    ("name", "frames"),
    [
        ("white 45% over a pan", lambda: with_logo(panning(1))),
        ("white 25% over a pan", lambda: with_logo(panning(2), alpha=0.25)),
        ("black 50% over a pan", lambda: with_logo(panning(3), alpha=0.5, color=(0, 0, 0))),
        ("over a slow pan", lambda: with_logo(panning(5, speed=(1.0, 0.3)))),
        ("over a fast pan", lambda: with_logo(panning(4, speed=(20.0, 5.0)))),
    ],
)
def test_translucent_logo_over_moving_content_is_found_and_boxed(name: str, frames) -> None:
    o = static_overlay(frames()[::2])
    assert o.score > 0.8, o
    assert o.box is not None and iou(o.box, truth_box()) >= 0.5, o


def test_logo_over_shaking_camera_beats_the_shake_alone() -> None:
    shaky = handheld(6)
    clean, marked = static_overlay(shaky[::2]), static_overlay(with_logo(shaky)[::2])
    assert marked.score > 0.3 and marked.score > 5 * clean.score, (clean, marked)
    assert iou(marked.box, truth_box()) >= 0.4


def test_fully_static_shot_is_no_evidence_even_with_a_logo() -> None:
    assert static_overlay(static(1)[::2]) == Overlay(score=0.0, box=None)
    assert static_overlay(with_logo(static(1))[::2]).score == 0.0
    assert static_overlay(static(1, noise=3.0)[::2]).score < 0.05


def test_letterbox_bars_are_not_a_mark_but_a_logo_beside_them_is() -> None:
    bars = panning(1)
    bars[:, :24] = 0
    bars[:, -24:] = 0
    assert static_overlay(bars[::2]).score < 0.1
    marked = static_overlay(with_logo(bars)[::2])
    assert marked.score > 0.5 and iou(marked.box, truth_box()) >= 0.3, marked


def test_fewer_than_three_frames_give_no_evidence() -> None:
    assert static_overlay(with_logo(panning(1))[:2]) == Overlay(score=0.0, box=None)
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\) uint8"):
        static_overlay(np.zeros((4, 8, 8), np.uint8))


def test_box_is_in_fractions_of_the_frame_at_any_input_size() -> None:
    big = with_logo(panning(1, h=288, w=480))  # larger than the working size: box must not change
    o = static_overlay(big[::2])
    assert o.score > 0.8 and iou(o.box, truth_box()) >= 0.5, o


def test_sample_logo_clip_beats_every_logo_free_clip(sample_dir, sample_truth) -> None:
    from pipeline import media
    from pipeline.scenecut import SceneCutConfig, clip_spans

    cfg = SceneCutConfig()
    scores: dict[str, Overlay] = {}
    for item in sample_truth.items:
        if item.fps is None:
            continue
        info = media.probe(sample_dir / item.file)
        frames = np.stack([f for _, f in media.open_frames(sample_dir / item.file, info, max_side=384)])
        for k, (s, e) in enumerate(clip_spans(list(item.cut_frames), len(frames), item.fps, cfg)):
            scores[f"{item.file}#{k}"] = static_overlay(frames[s:e:6])  # ~4 fps, as the CPU stage samples
    logo = scores.pop("logo.mp4#0")
    assert logo.box is not None and iou(logo.box, sample_truth.item("logo.mp4").logo_box) >= 0.5, logo
    assert all(logo.score > o.score for o in scores.values()), (logo, scores)
    assert max(o.score for o in scores.values()) < 0.3, scores


@pytest.mark.media
@pytest.mark.parametrize("name", ["car-detection.mp4", "friday.mp4", "stream-of-water.webm", "flower.webm"])
def test_real_footage_with_a_logo_added_scores_higher_and_is_boxed(media_dir, name: str) -> None:
    frames, times = decode_media(name, limit=300)
    step = max(1, round((len(times) - 1) / (times[-1] - times[0]) / 4))  # ~4 fps
    frames = np.stack([cv2.resize(f, (W, round(W * f.shape[0] / f.shape[1])), interpolation=cv2.INTER_AREA) for f in frames[::step][:40]])
    clean, marked = static_overlay(frames), static_overlay(with_logo(frames))
    assert marked.score > clean.score, (clean, marked)
    assert marked.box is not None and iou(marked.box, truth_box()) >= 0.4, marked
    assert clean.score < 0.35, clean


# ---------------------------------------------------------------------------------------------------------
# Across shots: the development set of real footage with translucent marks (tests/pipeline/devset_logos.py)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/pipeline: the dev-set builders
import devset_logos as dl  # noqa: E402

from pipeline.scoring.overlay import ClipMaps, VideoOverlay, best_evidence, clip_overlay  # noqa: E402
from pipeline.settings import PrefilterConfig  # noqa: E402


def _score_video(video: dl.LogoVideo) -> tuple[list[Overlay], Overlay | None, int]:
    """Each shot scored as the CPU stage scores a clip (~4 fps), then the video's evidence; best per clip."""
    pooled, own = VideoOverlay(), []
    for shot in video.shots:
        o, maps = clip_overlay(dl.analysis_frames(shot))
        pooled.add(maps)
        own.append(o)
    vid = pooled.result()
    return [best_evidence(o, vid) for o in own], vid, pooled.scenes


@pytest.fixture(scope="module", params=["tune", "check"])
def logo_devset(request, media_dir) -> tuple[str, list[tuple[dl.LogoVideo, list[Overlay], Overlay | None, int]]]:
    vids = dl.logo_videos(media_dir, request.param)
    return request.param, [(v, *_score_video(v)) for v in vids]


@pytest.mark.slow
@pytest.mark.media
def test_marks_across_cuts_are_found_and_boxed_on_every_clip(logo_devset) -> None:
    """Multi-shot dev videos (real shots joined with hard cuts, one translucent mark through all of them): every
    clip of a marked video is dropped by the default cut and boxed on the mark; no clean clip is dropped.
    Figures (both parts): ROC AUC 1.0; marked clips dropped 14/14; clean 0/14; box IoU 0.50-0.80 (tune), 0.63-0.80
    (check); the video-level evidence is 0.72-1.0 on marked videos and <= 0.13 on clean ones."""
    split, scored = logo_devset
    cut = PrefilterConfig().overlay_max
    pos, neg, ious = [], [], []
    for v, best, vid, scenes in scored:
        if len(v.shots) < 2 or "static-pieces" in v.name:
            continue
        assert scenes == len(v.shots), (v.name, scenes)  # different scenes stay apart
        for b in best:
            (pos if v.box else neg).append(b.score)
            if v.box:
                ious.append(dl.iou(b.box, v.box) if b.box else 0.0)
    print(f"{split}: multi-shot AUC {dl.roc_auc(pos, neg):.3f}, marked dropped {np.mean(np.array(pos) > cut):.2f}, "
          f"clean dropped {np.mean(np.array(neg) > cut):.2f}, IoU min {min(ious):.2f} median {np.median(ious):.2f}")
    assert dl.roc_auc(pos, neg) >= 0.95
    assert np.mean(np.array(pos) > cut) >= 0.9 and np.mean(np.array(neg) > cut) <= 0.1
    assert np.mean(np.array(ious) >= 0.5) >= 0.9, ious


@pytest.mark.slow
@pytest.mark.media
def test_static_camera_cut_into_clips_is_one_scene_and_not_flagged(logo_devset) -> None:
    """A locked-off camera cut into clips repeats its background in every clip: that is one scene, no evidence
    across shots, and the clean version is not flagged; nor is any clean single-shot video."""
    _, scored = logo_devset
    cut = PrefilterConfig().overlay_max
    for v, best, vid, scenes in scored:
        if "static-pieces" in v.name:
            assert scenes == 1 and vid is None, (v.name, scenes, vid)
        if v.box is None:
            assert all(b.score <= cut for b in best), (v.name, best)


@pytest.mark.slow
@pytest.mark.media
def test_whole_dev_set_figures(logo_devset) -> None:
    """All clips, single shots included (where only the clip's own persistence can tell). Measured: tune AUC 0.99,
    marked dropped 0.80, clean 0.00; check AUC 0.75, marked dropped 0.70, clean 0.00 (the single-shot film,
    handheld and tripod-room marks and the static bottle pieces score ~0: the clip scorer's blind spots)."""
    split, scored = logo_devset
    pos = [b.score for v, best, _, _ in scored if v.box for b in best]
    neg = [b.score for v, best, _, _ in scored if not v.box for b in best]
    auc = dl.roc_auc(pos, neg)
    print(f"{split}: all clips AUC {auc:.3f}, marked dropped {np.mean(np.array(pos) > 0.5):.2f}, "
          f"clean dropped {np.mean(np.array(neg) > 0.5):.2f}")
    assert auc >= {"tune": 0.95, "check": 0.7}[split]
    assert np.mean(np.array(neg) > 0.5) == 0.0


def _ocr_frames(frames: np.ndarray, fps: float = 4.0) -> tuple[np.ndarray, np.ndarray]:
    """What the OCR stage reads of a clip: the CPU stage's model frames (about model_fps, at least model_frames_max;
    its mean frame comes from these), and those thinned again to model_fps for the per-frame boxes
    (pipeline.analyze._score_clip, stages.OCRStage)."""
    from pipeline.analyze import _evenly, _every
    from pipeline.settings import DecodeConfig

    d = DecodeConfig()
    times = np.arange(len(frames)) / fps
    pick = _every(times, d.model_fps)
    if len(pick) < d.model_frames_max:
        pick = _evenly(np.arange(len(times)), d.model_frames_max)
    pick = _evenly(pick, d.model_frames_max)
    return frames[pick][_every(times[pick], d.model_fps)], frames[pick]


@pytest.mark.slow
@pytest.mark.media
def test_whole_dev_set_with_the_ocr_stage(logo_devset) -> None:
    """All clips, single shots included, judged as a curation run judges them: dropped when the overlay evidence is
    over ``overlay_max``, *or* the OCR stage's persistent text covers more than ``text_persistent_max``, *or* its
    corner read of the mean frame is more confident than ``text_mark_max`` (the real PP-OCRv4 detection and
    recognition weights; every mark kind here carries letters). The ranking score is the highest of the overlay
    score and the two OCR figures scaled so that their cut-offs land on 0.5. The box a dropped clip gets is the one
    of the evidence that dropped it, in that order.

    Measured: tune AUC 1.000, marked dropped 20/20, clean 0/20, boxes IoU >= 0.5 on 18/20; check AUC 0.955, marked
    dropped 19/20, clean 0/20, boxes on 17/19. Without the corner read: tune 1.00, 19/20; check 0.80, 15/20 (the
    single-shot film text and the three static-bottle pieces, over content that does not change, are what the read
    adds). The one mark still missed: a 31 % "HD+" frame over ground a handheld camera barely moves, which nothing
    reads."""
    pytest.importorskip("rapidocr_onnxruntime")
    from pipeline.models.ocr import TextDetector

    split, scored = logo_devset
    pre = PrefilterConfig()
    detector = TextDetector(threads=1)
    pos, neg, dropped, ious = [], [], {True: [], False: []}, []
    for v, best, _, _ in scored:
        for shot, b in zip(v.shots, best):
            sampled, model_frames = _ocr_frames(dl.analysis_frames(shot))
            st = detector.text_regions(sampled, mean_of=model_frames)
            score = max(b.score, min(1.0, 0.5 * st.persistent_area / pre.text_persistent_max),
                        min(1.0, 0.5 * st.mark_confidence / pre.text_mark_max))
            (pos if v.box else neg).append(score)
            by = [(b.score > pre.overlay_max, b.box), (st.persistent_area > pre.text_persistent_max, st.persistent_box),
                  (st.mark_confidence > pre.text_mark_max, st.mark_box)]
            dropped[v.box is not None].append(any(hit for hit, _ in by))
            if v.box and any(hit for hit, _ in by):
                box = next(bx for hit, bx in by if hit)
                ious.append(dl.iou(box, v.box) if box else 0.0)
    auc = dl.roc_auc(pos, neg)
    print(f"{split}: all clips with OCR AUC {auc:.3f}, marked dropped {sum(dropped[True])}/{len(dropped[True])}, "
          f"clean dropped {sum(dropped[False])}/{len(dropped[False])}, boxes IoU >= 0.5 "
          f"{sum(i >= 0.5 for i in ious)}/{len(ious)}")
    assert not any(dropped[False])
    assert auc >= 0.95 and np.mean(dropped[True]) >= 0.9
    assert np.mean(np.array(ious) >= 0.5) >= 0.85


def _clip_maps(rng: np.random.Generator, scene: np.ndarray | None, h: int = 54, w: int = 96) -> ClipMaps:
    """One clip's maps: a piece of ``scene`` (its mean luma plus a little noise), or an unrelated scene when None."""
    luma = rng.normal(128, 48, (h, w)) if scene is None else scene + rng.normal(0, 4, (h, w))
    return ClipMaps(mean_grad=rng.normal(0, 3, (2, h, w)).astype(np.float32),
                    energy=rng.uniform(0, 50, (h, w)).astype(np.float32), luma=luma.astype(np.float32),
                    changing=rng.random((h, w)) > 0.5, frames=12)


def test_video_evidence_memory_does_not_grow_with_the_number_of_clips() -> None:
    """The per-video pooling keeps running totals, not each clip's maps: the same bytes after 5 pieces of one long
    shot as after 50, and with many distinct scenes no more than ``max_scenes`` scenes' worth."""
    rng = np.random.default_rng(0)
    scene = rng.normal(128, 48, (54, 96))
    held = {}
    for n in (5, 50):
        pooled = VideoOverlay()
        for _ in range(n):
            pooled.add(_clip_maps(rng, scene))
        assert pooled.scenes == 1 and pooled.result() is None
        held[n] = pooled.nbytes
    assert held[5] == held[50] > 0, held
    distinct = {}
    for n in (20, 50):
        pooled = VideoOverlay(max_scenes=16)
        for _ in range(n):
            pooled.add(_clip_maps(rng, None))
        assert pooled.scenes == 16
        assert isinstance(pooled.result(), Overlay)
        distinct[n] = pooled.nbytes
    assert distinct[20] == distinct[50], distinct


def test_no_box_without_evidence() -> None:
    o = static_overlay(static(1, noise=3.0)[::2])
    assert o.score < 0.05 and o.box is None, o
    assert static_overlay(LOGO_FREE["noise"]()[::2]).box is None


@pytest.mark.media
def test_curation_gives_every_clip_its_videos_evidence(media_dir, tmp_path) -> None:
    """Through the CPU stage on an encoded file: a mark across four real shots puts the video-level score and box on
    every clip (dropped as static_overlay) and on the video row; the clean file's clips keep their own evidence."""
    import av

    from pipeline.analyze import analyze_video
    from pipeline.scenecut import SceneCutConfig
    from pipeline.settings import DecodeConfig

    # Shots of 3 s: a clip keeps 2 s after the 0.25 s trims at both ends.
    shots = [dl.source(media_dir, name, start, 90) for name, start in
             (("friday.mp4", 10), ("one-by-one-person-detection.mp4", 700), ("flower.webm", 30), ("again.mkv", 0))]
    mark = dl.random_mark(np.random.default_rng(7), "bug")
    clean = dl.LogoVideo("clean", shots)
    marked = dl.LogoVideo("marked", *dl.composite(shots, mark), mark)
    results = {}
    for v in (clean, marked):
        path = tmp_path / f"{v.name.replace('/', '-')}.mp4"
        with av.open(str(path), "w") as out:
            st = out.add_stream("libx264", rate=30, options={"crf": "18"})
            st.width, st.height, st.pix_fmt, st.thread_count = 320, 180, "yuv420p", 1
            for f in np.concatenate(v.shots):
                out.mux(st.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
            out.mux(st.encode())
        results[v.box is not None] = analyze_video(str(path), DecodeConfig(), SceneCutConfig(), PrefilterConfig())
    res = results[True]
    assert res.video["overlay_score"] > 0.5 and iou(res.video["overlay_box"], marked.box) >= 0.5, res.video
    assert len(res.clips) >= 3
    for c in res.clips:
        r = c.record
        assert r["overlay_video_score"] == res.video["overlay_score"]
        assert r["overlay_score"] == max(r["overlay_clip_score"], r["overlay_video_score"])
        assert iou(r["overlay_box"], marked.box) >= 0.5 and "static_overlay" in r["reject_reasons"], r
    for c in results[False].clips:
        r = c.record
        assert r["overlay_score"] == r["overlay_clip_score"] < 0.5 and "static_overlay" not in r["reject_reasons"], r
        assert (r["overlay_box"] is None) == (r["overlay_score"] < 0.05), r
