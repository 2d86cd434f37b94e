"""Static overlay (logo, channel bug, burned-in watermark) evidence without model weights.

An overlay is drawn on top of the picture, so its edges stay put, with the same orientation, in every
frame while the picture under and around it changes. Natural content does not do that: on a moving
shot its edges move, and on a static shot nothing changes, so there is no evidence either way (a
fully static shot scores 0 rather than "everything is a logo").

Over up to ``MAX_FRAMES`` frames spread across the clip (luma at longer side ``WORK_SIDE``, each frame
rescaled to a fixed mean and spread so exposure drift and flicker are not "change"), per pixel:

* the gradient ``g_t`` of the fine-detail band (luma minus its Gaussian blur): coarse structure stays
  correlated under a slow pan and would persist, a mark's edges are sharp;
* persistent edge strength ``P = |mean_t g_t|`` and coherence ``C = |mean_t g_t|^2 / mean_t |g_t|^2``:
  1 when the gradient is identical in every frame, about 1/K when it wanders (a translucent logo
  over moving texture sits in between, hence the low cut);
* change ``T``: temporal standard deviation of the luma.

Candidates are strong, coherent edges with change within a few pixels. When the camera moves (phase
correlation finds a global shift), an edge must also be clearly *less* coherent once the frames are
aligned on the scene: shake and slow pans keep scene edges coherent in both, a mark only in the
frame. Frame-wide lines (letterbox/pillarbox edges) are removed. The largest connected group of
candidates is the overlay guess; its score is the product of

* ``ring``: the fraction of a band around the group's box whose content changes (a logo is surrounded
  by changing picture; a static background edge next to one moving object is only partly);
* ``share``: the group's share of all candidate edge strength (one compact mark, not scattered
  coincidences);
* ``support``: how many candidate pixels it holds, saturating at a small logo's outline;
* ``isotropy``: a mark has edges in several directions; stripes a pan slides along (the aperture
  problem) persist too but share one orientation;
* ``size``: boxes covering more than a quarter of the frame fade out (that is scenery, not a mark).

Across shots (:class:`VideoOverlay`): the same maps of each clip (:class:`ClipMaps`, a few small arrays) are
pooled over the clips of one video, as running totals per scene (bounded memory: at most ``MAX_SCENES`` scenes,
whatever the number of clips). Clips whose mean picture is alike (pieces of one long shot, a locked-off camera
cut into clips) are merged first, so only *different scenes* count as evidence: a static background repeats in
every piece of its shot but not across a cut, while a mark does. The pooled persistence is judged like a clip's,
with the coherence cut raised to what chance gives for so few samples (two unrelated static scenes already
average to 0.5), and the change map is where the picture differs between scenes or changes within one. A video
with fewer than two distinct scenes has no video-level evidence (None): its clips keep their own.
:func:`best_evidence` then gives each clip the stronger of its own and its video's evidence.

Known blind spots: an overlay on a static shot (no evidence by design, unless other scenes of the video show it);
on a static camera with one moving object, background edges next to the object's path can collect a weak score
(real footage here: <= 0.3); opaque marks on content that changes only far from them.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import cv2
import numpy as np

from pipeline.scoring import _frames
from pipeline.scoring._frames import check_frames, check_luma, shrink, working_size

WORK_SIDE = 192
MAX_FRAMES = 12
HIGHPASS_SIGMA = 1.5
NORM_STD = 48.0         # every frame's luma is rescaled to this spread (typical footage: 40-60)
FLAT_STD = 8.0          # ...but a nearly flat frame (a fade) is not stretched beyond this
JITTER_MIN_PX = 0.75    # global shift spread (working px) above which the camera counts as moving
FRAME_OVER_SCENE = 0.2  # a mark's coherence must beat its coherence on scene-aligned frames by this
MIN_FRAMES = 3
EDGE_MIN = 4.0          # luma levels per px: weaker persistent gradients are codec/noise texture
COHERENCE_MIN = 0.35    # random gradients over K=12 frames average ~0.08 and exceed 0.35 for ~1.5% of pixels
CHANGE_MIN = 6.0        # temporal luma std that counts as "the content here changes"
NEAR_PX = 4             # a candidate edge needs change within this many working pixels
ISOTROPY_FULL = 0.25    # structure-tensor eigenvalue ratio at which edge directions count as varied
LINE_FRACTION = 0.6     # a row/column this full of candidates is a frame-wide line (letterbox edge)
MASS_FULL = 60          # candidate pixels at which a group counts as fully supported (a ~15x8 px outline)
BOX_MIN_SCORE = 0.05    # below this there is no evidence: no box is reported
VIDEO_COHERENCE_ABOVE_CHANCE = 0.2  # tuned on the dev set's tune part (0.35, a clip's cut, missed a 5-scene mark)
SAME_SCENE_CORR = 0.6   # clips whose mean normalised luma correlates this much show one scene (pieces of a shot)
MAX_SCENES = 16         # scenes a video's running totals keep apart (~6.6 MB at 192x108); further ones are folded in


@dataclass(frozen=True, slots=True)
class Overlay:
    score: float
    """Evidence in [0, 1] that a static overlay sits on the clip; 0 when there is no evidence."""
    box: tuple[float, float, float, float] | None
    """(x0, y0, x1, y1) of the overlay as fractions of width and height; None when nothing was found."""


NONE = Overlay(score=0.0, box=None)


@dataclass(frozen=True)
class ClipMaps:
    """What the video-level evidence needs of one clip, at the clip's working size (h, w)."""

    mean_grad: np.ndarray   # (2, h, w) mean over frames of the fine-band gradient
    energy: np.ndarray      # (h, w) mean over frames of its squared length
    luma: np.ndarray        # (h, w) mean normalised luma (tells scenes apart)
    changing: np.ndarray    # (h, w) bool: the content here changes within the clip
    frames: int


def _pick(n: int, k: int) -> np.ndarray:
    return np.unique(np.round(np.linspace(0, n - 1, min(n, k))).astype(int))


def _normalised(gray: np.ndarray) -> np.ndarray:
    """Luma with a fixed mean and spread, so exposure drift and flicker are not "change"."""
    g = gray.astype(np.float32)
    mean, std = cv2.meanStdDev(g)
    return (g - float(mean[0, 0])) * (NORM_STD / max(float(std[0, 0]), FLAT_STD)) + 128.0


def _fine_gradients(grays: Iterable[np.ndarray], k: int, h: int, w: int) -> np.ndarray:
    """(k, 2, h, w) gradients of the fine-detail band of ``k`` (h, w) float32 frames, in luma levels per pixel.

    Written frame by frame into one array: a clip's stack is ~2 MB, and stacking per-frame copies (then dividing
    into a third array) made the allocator hand pages back and fault them in again on every clip."""
    grads = np.empty((k, 2, h, w), np.float32)
    for i, gray in enumerate(grays):
        # Only fine detail: coarse content structure stays correlated over a slow pan and would average
        # into persistent streaks along the motion, while a mark's edges are sharp.
        fine = gray - cv2.GaussianBlur(gray, (0, 0), HIGHPASS_SIGMA)
        for axis, (dx, dy) in enumerate(((1, 0), (0, 1))):
            row = grads[i, axis]
            if cv2.Sobel(fine, cv2.CV_32F, dx, dy, dst=row, ksize=3) is not row:
                raise ValueError(f"expected Sobel to write into the (h, w) = {(h, w)} float32 row of the gradient "
                                 f"stack, got a frame of shape {fine.shape}")
    grads /= 8.0  # Sobel of a unit ramp is 8
    return grads


def _persistence(grads: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """mean_t g (2, h, w), |mean_t g|^2, coherence |mean_t g|^2 / mean_t |g|^2 and mean_t |g|^2 of (K, 2, h, w)
    gradients."""
    mean = grads.mean(axis=0)                                          # (2, h, w)
    persist_sq = (mean * mean).sum(axis=0)
    # |g|^2 frame by frame (the same sums as squaring the whole stack, without its 2 MB square)
    sq = np.multiply(grads[:, 0], grads[:, 0])                         # (K, h, w)
    for i in range(len(grads)):
        sq[i] += grads[i, 1] * grads[i, 1]
    energy = sq.mean(axis=0)                                           # (h, w)
    return mean, persist_sq, persist_sq / (energy + 1e-6), energy


def _global_shifts(grays: np.ndarray) -> np.ndarray:
    """(K, 2) translation of each frame relative to the middle one (phase correlation)."""
    k, h, w = grays.shape
    window = cv2.createHanningWindow((w, h), cv2.CV_32F)
    ref = grays[k // 2]
    # OpenCV 5 applies the window to its inputs in place: hand it copies.
    return np.asarray([cv2.phaseCorrelate(ref.copy(), g.copy(), window)[0] for g in grays], np.float32)


def _shift(gray: np.ndarray, dx: float, dy: float) -> np.ndarray:
    h, w = gray.shape
    return cv2.warpAffine(gray, np.float32([[1, 0, dx], [0, 1, dy]]), (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


def static_overlay(frames: np.ndarray) -> Overlay:
    """Static-overlay evidence for (N, H, W, 3) uint8 RGB frames spread over one clip (N >= 3)."""
    return clip_overlay(frames)[0]


def clip_overlay(frames: np.ndarray, *, luma: np.ndarray | None = None) -> tuple[Overlay, ClipMaps | None]:
    """:func:`static_overlay`, and the clip's maps for :class:`VideoOverlay` (None with under 3 frames).

    ``luma``: the frames' (N, H, W) luma (``_frames.luma``) when the caller has it already."""
    frames = check_frames(frames, "static_overlay")
    if len(frames) < MIN_FRAMES:
        return NONE, None
    h0, w0 = frames.shape[1:3]
    size = working_size(h0, w0, min(WORK_SIDE, max(h0, w0)))
    picks = _pick(len(frames), MAX_FRAMES)
    # (K, H, W) uint8: the caller's luma, or the picked frames' own
    lumas = check_luma(luma, frames, "static_overlay")[picks] if luma is not None else _frames.luma(frames[picks])
    grays = np.stack([_normalised(shrink(g, size)) for g in lumas])  # (K, h, w) float32
    changing = grays.std(axis=0) > CHANGE_MIN                          # (h, w) bool
    grads = _fine_gradients(grays, *grays.shape)                       # (K, 2, h, w)
    mean_grad, persist_sq, coherence, energy = _persistence(grads)
    del grads
    maps = ClipMaps(mean_grad=mean_grad, energy=energy, luma=grays.mean(axis=0), changing=changing, frames=len(grays))
    if not changing.any():
        return NONE, maps
    strong = (persist_sq > EDGE_MIN**2) & (coherence > COHERENCE_MIN)
    shifts = _global_shifts(grays)                                     # (K, 2) px vs the middle frame
    if np.ptp(shifts, axis=0).max() >= JITTER_MIN_PX:
        # The camera moves: an edge that is as persistent once the frames are aligned on the scene
        # belongs to the scene (shake, slow pan), not to a mark fixed to the frame.
        aligned = _fine_gradients((_shift(g, -dx, -dy) for g, (dx, dy) in zip(grays, shifts)), *grays.shape)
        _, _, coherence_scene, _ = _persistence(aligned)
        strong &= coherence - coherence_scene > FRAME_OVER_SCENE
    return _judge(strong, changing, mean_grad, persist_sq, coherence), maps


def _judge(strong: np.ndarray, changing: np.ndarray, mean_grad: np.ndarray, persist_sq: np.ndarray,
           coherence: np.ndarray) -> Overlay:
    """Score and box of the best group of ``strong`` persistent edges (h, w) next to ``changing`` content."""
    h, w = strong.shape
    near = cv2.dilate(changing.astype(np.uint8), np.ones((2 * NEAR_PX + 1,) * 2, np.uint8)) > 0
    cand = strong & near
    cand[:2, :] = cand[-2:, :] = cand[:, :2] = cand[:, -2:] = False  # codec padding rows/cols persist too
    # Letterbox/pillarbox borders and split-screen seams are persistent lines across the whole frame:
    # not marks, and a mark touching one must not be merged into it and discarded with it.
    for axis, length in ((1, w), (0, h)):
        lines = np.nonzero(cand.sum(axis=axis) > LINE_FRACTION * length)[0]
        for i in lines:
            sl = slice(max(0, i - 1), i + 2)
            if axis == 1:
                cand[sl, :] = False
            else:
                cand[:, sl] = False
    if not cand.any():
        return NONE
    weight = np.where(cand, np.sqrt(persist_sq) * coherence, 0.0)   # strong, steady edges count most
    total = float(weight.sum())

    # Join a mark's strokes and outline into one group.
    joined = cv2.dilate(cand.astype(np.uint8), np.ones((5, 5), np.uint8))
    n_lab, labels, stats, _ = cv2.connectedComponentsWithStats(joined, connectivity=8)
    counts = np.bincount(labels[cand], minlength=n_lab)              # candidate pixels per group
    mass_w = np.bincount(labels[cand], weights=weight[cand], minlength=n_lab)
    counts[0] = 0
    for lab in range(1, n_lab):
        x, y, bw, bh, _ = stats[lab]
        if bw >= 0.9 * w or bh >= 0.9 * h:
            counts[lab] = 0  # frame-spanning lines: letterbox/pillarbox bars or splits, not a mark
    best = int(np.argmax(counts))
    mass = int(counts[best])
    if mass == 0:
        return NONE
    ys, xs = np.nonzero(cand & (labels == best))
    x0, x1, y0, y1 = int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1

    bw, bh = x1 - x0, y1 - y0
    margin = max(3, round(0.3 * min(bw, bh)))
    rx0, ry0, rx1, ry1 = max(0, x0 - margin), max(0, y0 - margin), min(w, x1 + margin), min(h, y1 + margin)
    ring_mask = np.zeros((h, w), bool)
    ring_mask[ry0:ry1, rx0:rx1] = True
    ring_mask[y0:y1, x0:x1] = False
    ring = float(changing[ring_mask].mean()) if ring_mask.any() else 0.0

    # A mark has edges in several directions; stripes that a pan slides along (the aperture problem)
    # persist too, but all share one orientation.
    mx, my = mean_grad[0][ys, xs], mean_grad[1][ys, xs]
    jxx, jyy, jxy = float((mx * mx).sum()), float((my * my).sum()), float((mx * my).sum())
    half_gap = np.sqrt(((jxx - jyy) / 2) ** 2 + jxy**2)
    lam_max, lam_min = (jxx + jyy) / 2 + half_gap, (jxx + jyy) / 2 - half_gap
    isotropy = min(1.0, lam_min / (ISOTROPY_FULL * lam_max + 1e-9))

    share = float(mass_w[best]) / total
    support = min(1.0, mass / MASS_FULL)
    area = bw * bh / (w * h)
    size_ok = float(np.clip((0.5 - area) / 0.25, 0.0, 1.0))
    score = float(np.clip(ring * share * support * size_ok * isotropy, 0.0, 1.0))
    if score < BOX_MIN_SCORE:
        return Overlay(score=score, box=None)
    return Overlay(score=score, box=(x0 / w, y0 / h, x1 / w, y1 / h))


@dataclass
class _Scene:
    """Running totals of the clips of one scene: a fixed handful of (h, w) planes, however many clips it has."""

    ref: np.ndarray      # (h, w) the first clip's mean luma: later clips are compared with it
    grad: np.ndarray     # (2, h, w) sum over clips of frames * mean_grad
    energy: np.ndarray   # (h, w) sum over clips of frames * energy
    luma: np.ndarray     # (h, w) sum over clips of their mean luma
    frames: int = 0
    clips: int = 0

    def add(self, maps: ClipMaps) -> None:
        self.grad += maps.frames * maps.mean_grad
        self.energy += maps.frames * maps.energy
        self.luma += maps.luma
        self.frames += maps.frames
        self.clips += 1


class VideoOverlay:
    """Static-overlay evidence pooled over the clips of one video: edges that stay put across different scenes.

    Memory is bounded by ``max_scenes``, not by the number of clips: each clip is folded into its scene's running
    totals (:class:`_Scene`) as it arrives and its maps are not kept, so a one-shot hour cut into hundreds of clips
    holds what a few clips do. A video with more distinct scenes than ``max_scenes`` folds each further one into the
    scene it resembles most: that scene's sample then averages two scenes, which dilutes their edges while a mark,
    present in both, keeps its strength.
    """

    def __init__(self, max_scenes: int = MAX_SCENES) -> None:
        if max_scenes < 2:
            raise ValueError(f"max_scenes: expected at least 2 (evidence needs two scenes), got {max_scenes}")
        self.max_scenes = max_scenes
        self._scenes: list[_Scene] = []
        self._changing: np.ndarray | None = None   # (h, w) bool: content changes within some clip

    def add(self, maps: ClipMaps | None) -> None:
        if maps is None:
            return
        if self._changing is None:
            self._changing = np.zeros(maps.luma.shape, bool)
        elif self._changing.shape != maps.luma.shape:
            raise ValueError(f"clip maps of one video must share a size: {self._changing.shape} then "
                             f"{maps.luma.shape}")
        self._changing |= maps.changing
        corr = [_correlation(sc.ref, maps.luma) for sc in self._scenes]
        same = next((i for i, c in enumerate(corr) if c >= SAME_SCENE_CORR), None)
        if same is None and len(self._scenes) >= self.max_scenes:
            same = int(np.argmax(corr))
        if same is None:
            h, w = maps.luma.shape
            self._scenes.append(_Scene(ref=maps.luma.astype(np.float32, copy=True),
                                       grad=np.zeros((2, h, w), np.float32), energy=np.zeros((h, w), np.float32),
                                       luma=np.zeros((h, w), np.float32)))
            same = len(self._scenes) - 1
        self._scenes[same].add(maps)

    @property
    def scenes(self) -> int:
        return len(self._scenes)

    @property
    def nbytes(self) -> int:
        """Bytes held by the running totals (what grows with the video: only up to ``max_scenes`` scenes)."""
        held = 0 if self._changing is None else self._changing.nbytes
        return held + sum(a.nbytes for sc in self._scenes for a in (sc.ref, sc.grad, sc.energy, sc.luma))

    def result(self) -> Overlay | None:
        """The video-level evidence, or None with fewer than two distinct scenes."""
        n = len(self._scenes)
        if n < 2:
            return None
        # One sample per scene (its clips' frames pooled), so a long scene does not outvote the others. Built scene
        # by scene into (h, w) planes and one (S, h, w) stack, not (S, 2, h, w) ones: this runs as the video ends,
        # when the decode's buffers are still held, so its temporaries add to the analysis's peak.
        h, w = self._changing.shape
        mean_grad = np.zeros((2, h, w), np.float32)
        energy = np.zeros((h, w), np.float32)
        for sc in self._scenes:
            mean_grad += sc.grad / sc.frames
            energy += sc.energy / sc.frames
        mean_grad /= n
        energy /= n
        coherence = (mean_grad * mean_grad).sum(axis=0) / (energy + 1e-6)
        # A mark is there in (nearly) every scene: its edge strength is the weakest scene's gradient along the
        # pooled direction, so an edge of one scene, whatever the others average to there, has ~none. One scene in
        # four may miss it (a white mark over a white wall is invisible there).
        unit = mean_grad / (np.sqrt((mean_grad * mean_grad).sum(axis=0)) + 1e-6)
        along = np.empty((n, h, w), np.float32)
        for k, sc in enumerate(self._scenes):
            np.multiply(sc.grad[0], unit[0], out=along[k])
            along[k] += sc.grad[1] * unit[1]
            along[k] /= sc.frames
        along.sort(axis=0)
        along = np.clip(along[n // 4], 0.0, None)                                   # (h, w)
        persist_sq = along * along
        # Unrelated scenes average to coherence ~1/S by chance: ask for a share of the way above it (less than a
        # clip's cut: a translucent mark's coherence is diluted by every textured scene behind it).
        chance = 1.0 / n
        strong = (persist_sq > EDGE_MIN**2) & (coherence > chance + VIDEO_COHERENCE_ABOVE_CHANCE * (1.0 - chance))
        # Where the picture differs between scenes (the spread of their mean luma) or changes within a clip.
        luma_mean = np.zeros((h, w), np.float32)
        for sc in self._scenes:
            luma_mean += sc.luma / sc.clips
        luma_mean /= n
        spread = np.zeros((h, w), np.float32)
        for sc in self._scenes:
            d = sc.luma / sc.clips - luma_mean
            spread += d * d
        changing = (np.sqrt(spread / n) > CHANGE_MIN) | self._changing
        return _judge(strong, changing, mean_grad, persist_sq, coherence)


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    den = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum()) / den if den > 0 else 1.0


def best_evidence(clip: Overlay | None, video: Overlay | None) -> Overlay | None:
    """The stronger of a clip's own overlay evidence and its video's (None when neither exists)."""
    if video is None or (clip is not None and clip.score >= video.score):
        return clip
    return video
