"""Scene-cut detection on a decoded frame stream, and clip spans from the cuts.

The media layer decodes each video once and pushes every frame into a :class:`CutDetector`;
PySceneDetect's detectors do the scoring. Frames are shrunk to ``detect_width`` first: the
detectors work on whole-frame HSV differences, so a 160 px frame finds the same hard cuts as a
full-size one at a fraction of the cost (PySceneDetect's own ``auto_downscale`` targets 256 px).

The same small frames give each frame's mean luma and chroma (no second pass over the pixels): a run of black
frames (mean luma under ``black_luma``) with the fade-out before it and the fade-in after it is a
:class:`Transition`, cut out of every clip and counted as one boundary at the middle of its black frames; a video
whose non-black frames carry no chroma is grayscale, and its cuts are scored on luma alone (hue and saturation of
a black-and-white film are codec noise). On the real-footage development set (tests/pipeline/devset.py: hard cuts,
0.3 s shots, fades through black, grayscale copies and a real 1940 film) every cut is found within 2 frames.

Frame numbers are 0-based everywhere. A cut at frame ``c`` means a new scene starts at ``c``.
"""
from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
from scenedetect import FrameTimecode
from scenedetect.detectors import AdaptiveDetector, ContentDetector

from catalog.config import ConfigError

DETECTORS = ("adaptive", "content")


@dataclass(frozen=True, kw_only=True, slots=True)
class SceneCutConfig:
    """TOML section ``[scenecut]``."""

    detector: str = "adaptive"
    """``"adaptive"`` (rolling-average ratio; best on hard cuts and camera motion) or ``"content"``
    (fixed threshold on the HSV/edge difference; better on fades)."""
    luma_only: bool = False
    """Always score only luma changes. Black-and-white footage switches to luma-only by itself (``auto_luma``)."""
    auto_luma: bool = True
    """Score only luma changes when the video's first non-black frames are grayscale: hue and saturation of a
    black-and-white film are codec noise that dilutes the cut score (4 of 9 cuts found instead of 9)."""
    gray_chroma_max: float = 0.5
    """A frame is grayscale when its mean chroma deviation (``(|Cr - 128| + |Cb - 128|) / 2`` at detect size) is
    below this. Measured: black-and-white film and grayscale copies <= 0.05 after H.264; the least colourful colour
    footage here (grey asphalt from an overhead camera) 0.7, ordinary footage 5-17."""
    black_luma: float = 12.0
    """A frame whose mean luma (0-255) is below this is black (PySceneDetect's threshold detector uses 12 too)."""
    max_fade_s: float = 2.0
    """Longest fade-out before / fade-in after a black stretch that is cut out of the clips with it."""
    detect_width: int = 160
    """Frames are downscaled to this width before detection; the main speed lever."""
    adaptive_threshold: float = 3.0
    """Adaptive detector: a frame's score must exceed this multiple of its neighbours' average."""
    min_content_val: float = 15.0
    """Adaptive detector: and the frame's content score must be at least this."""
    content_threshold: float = 27.0
    """Content detector: the frame's content score must be at least this."""
    min_scene_s: float = 0.0
    """No two cuts closer than this (seconds). 0 records every cut (fast-cut footage has shots of 0.3 s); the
    ``min_clip_s`` limit then decides what is kept, so a short shot is dropped instead of merged into its neighbour."""
    trim_s: float = 0.25
    """Dropped at each end of a scene so clips carry no half-faded frames from a transition."""
    min_clip_s: float = 2.0
    """Clips shorter than this (after trimming) are dropped."""
    max_clip_s: float = 10.0
    """Longer scenes are split into equal pieces no longer than this."""

    def __post_init__(self) -> None:
        if self.detector not in DETECTORS:
            raise ConfigError(f"[scenecut] detector: expected one of {list(DETECTORS)}, got {self.detector!r}")
        if self.detect_width < 16:
            raise ConfigError(f"[scenecut] detect_width: expected >= 16 px, got {self.detect_width}")
        for name in ("min_scene_s", "trim_s", "gray_chroma_max", "black_luma", "max_fade_s"):
            if getattr(self, name) < 0:
                raise ConfigError(f"[scenecut] {name}: expected >= 0, got {getattr(self, name)}")
        if not 0 < self.min_clip_s <= self.max_clip_s:
            raise ConfigError(
                f"[scenecut] expected 0 < min_clip_s <= max_clip_s, got min_clip_s={self.min_clip_s}, "
                f"max_clip_s={self.max_clip_s}"
            )


def _check_fps(fps: float) -> None:
    if not (fps > 0 and math.isfinite(fps)):
        raise ValueError(f"fps: expected a positive finite number, got {fps!r}")


# Frames that only dim or brighten towards black by at least this much (relative, plus absolute levels) per frame
# belong to a fade; natural footage rarely changes its mean luma by 2 % frame after frame.
_FADE_REL = 0.02
_FADE_ABS = 0.5
# Hard cuts this close (frames) to a fade or black stretch are its own edges (a cut to black, a cut from black).
_ABSORB = 2
# Grayscale is decided on this many non-black frames (at most GRAY_PROBE_S of video is held back for it).
_GRAY_FRAMES = 8
# Chroma is read on every _CHROMA_EVERY-th frame only: whether footage is black-and-white changes slowly.
_CHROMA_EVERY = 4
_GRAY_PROBE_S = 3.0
# A video is grayscale when at least this share of its non-black frames is.
_GRAY_SHARE = 0.95


class _ExactScore:
    """PySceneDetect's frame score, the same numbers from fewer array passes.

    ContentDetector splits the HSV frame and takes, per plane, ``sum(|int32(a) - int32(b)|) / pixels``: six
    casts, three subtractions and three reductions per frame, half of the cut detector's time. The absolute
    difference of uint8 planes is exact in uint8 and its sum (at most 255 x pixels) exact in float64, so
    ``cv2.absdiff`` + ``cv2.sumElems`` over the 3-channel frame give the same component values, and the same
    weighted mean in the same order gives the same score, bit for bit (tested against the stock detector).
    Edges and stats managers, which this product never enables, fall back to PySceneDetect's own code.
    """

    _last_hsv: np.ndarray | None = None

    def _calculate_frame_score(self, timecode: FrameTimecode, frame_img: np.ndarray) -> float:
        if self._weights.delta_edges > 0.0 or self.stats_manager is not None:
            return super()._calculate_frame_score(timecode, frame_img)
        hsv = cv2.cvtColor(frame_img, cv2.COLOR_BGR2HSV)
        last, self._last_hsv = self._last_hsv, hsv
        if last is None:
            return 0.0
        sums = cv2.sumElems(cv2.absdiff(hsv, last))
        pixels = float(hsv.shape[0] * hsv.shape[1])
        components = (sums[0] / pixels, sums[1] / pixels, sums[2] / pixels, 0.0)
        return sum(c * w for c, w in zip(components, self._weights, strict=True)) / sum(abs(w) for w in self._weights)


class _Adaptive(_ExactScore, AdaptiveDetector):
    """AdaptiveDetector with :meth:`process`: its ``process_frame`` on frame numbers instead of timecodes.

    The stock method wraps every frame in ``FrameTimecode`` objects, whose arithmetic (a subtraction and a
    comparison per frame, each checking frame rates) is most of the detector's Python time, and it runs the
    content detector's flash filter, whose answer the adaptive detector throws away. ``process`` does the same
    steps on ints and floats in the same order, so scores, ratios and cuts are the same (tested against the stock
    detector frame by frame); with a stats manager it falls back to the stock method, which records metrics.
    """

    def __init__(self, *args, fps: float = 30.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._fps = fps
        self._scores: list[tuple[int, float]] = []
        self._last_index_cut: int | None = None

    def process(self, index: int, frame_img: np.ndarray) -> list[int]:
        if self.stats_manager is not None:
            return [tc.frame_num for tc in self.process_frame(FrameTimecode(index, self._fps), frame_img)]
        score = self._calculate_frame_score(None, frame_img)
        if self._last_index_cut is None:
            self._last_index_cut = index
        w = self.window_width
        buf = self._scores
        buf.append((index, score))
        if len(buf) < 1 + 2 * w:
            return []
        del buf[:-(1 + 2 * w)]
        target, target_score = buf[w]
        average = sum(s for i, (_, s) in enumerate(buf) if i != w) / (2.0 * w)
        ratio = 0.0
        if abs(average) >= 0.00001:
            ratio = min(target_score / average, 255.0)
        elif target_score >= self.min_content_val:
            ratio = 255.0
        if ratio >= self.adaptive_threshold and target_score >= self.min_content_val \
                and target - self._last_index_cut >= self.min_scene_len:
            self._last_index_cut = target
            return [target]
        return []


class _Content(_ExactScore, ContentDetector):
    pass


@dataclass(frozen=True, slots=True)
class Transition:
    """A fade or black stretch: ``[start, end)`` is cut out of every clip; ``black`` is its black frames."""

    start: int
    black_start: int
    black_end: int
    end: int

    @property
    def cut(self) -> int:
        """Where the next scene starts for cut counting: the middle of the black frames (a symmetric fade's
        thresholded black run is wider than the fully black frames by the same amount at both ends)."""
        return (self.black_start + self.black_end) // 2


class CutDetector:
    """Streaming scene-cut detector: ``push`` every decoded frame in order, then ``finish``.

    Besides PySceneDetect's hard cuts it finds fades and black stretches from each frame's mean luma, and whether
    the footage is grayscale from its chroma; both come from the small frame the detector gets anyway (no second
    pass over the pixels). ``boundaries_so_far`` lists final scene boundaries ``(end, start)``: the scene before
    ends at ``end`` (exclusive) and the next starts at ``start``; a hard cut is ``(c, c)``, a fade ``(start, end)``
    of its :class:`Transition`.

    Args:
        cfg: the ``[scenecut]`` settings.
        fps: the video's (average) frame rate; turns the settings in seconds into frames.
    """

    def __init__(self, cfg: SceneCutConfig, fps: float) -> None:
        _check_fps(fps)
        self.cfg = cfg
        self.fps = float(fps)
        # An int length makes the detectors compare frame counts exactly (no float rounding at NTSC rates).
        self._min_len = max(1, round(cfg.min_scene_s * fps))
        self._max_fade = max(1, round(cfg.max_fade_s * fps))
        self._detector: AdaptiveDetector | ContentDetector | None = None
        self._luma_only = cfg.luma_only
        self._held: list[tuple[int, np.ndarray]] = []  # frames held back until grayscale is decided
        self._cuts: list[int] = []                       # PySceneDetect's hard cuts, as reported
        self._last_index = -1
        # The adaptive detector judges frame i only once it has seen frames i+1..i+window; keep
        # that many recent (small, BGR) frames so finish() can feed a mirrored tail.
        self._recent: list[np.ndarray] = []
        self._finished = False
        # Per-frame statistics, by position (indices may jump over damaged frames).
        self._index: list[int] = []
        self._luma: list[float] = []
        self._nonblack = 0
        self._gray_nonblack = 0
        self._gray_frames = 0
        self._chroma_seen = 0        # frames whose chroma was read, and the non-black ones among them
        self._chroma_nonblack = 0
        # Fade / black state: the open transition's start and black start (positions), black end, fade-in end.
        self._open: list[int] | None = None
        self._transitions: list[Transition] = []
        self._hard_seen = 0          # how many of self._cuts were looked at
        self._pending: list[int] = []  # hard cuts not yet final (a fade may still start right after them)
        self._ready: list[tuple[int, int]] = []
        self._boundaries: list[tuple[int, int]] = []
        self._floor = 0              # position no fade may reach back before (the last boundary's start)
        self._steady = -1            # the latest position not a fade step darker than the one before it
        self._mid: np.ndarray | None = None
        self._auto = cfg.auto_luma and not cfg.luma_only
        self._gray_run: deque[bool] = deque(maxlen=_GRAY_FRAMES)  # the latest non-black frames: grayscale?
        self._recent_index: list[int] = []
        self._ignore_before = 0
        self._fed = 0
        self._fed_luma = 0

    @property
    def name(self) -> str:
        c = self.cfg
        if c.detector == "adaptive":
            head = f"adaptive(t={c.adaptive_threshold},min={c.min_content_val}"
        else:
            head = f"content(t={c.content_threshold}"
        if self._auto:  # which mode the frames were scored in
            luma = "auto:" + ("mixed" if 0 < self._fed_luma < self._fed else str(self._luma_only))
        else:
            luma = c.luma_only
        return f"{head},len={c.min_scene_s}s,luma={luma},w={c.detect_width})+fades(black<{c.black_luma})"

    @property
    def lag_frames(self) -> int:
        """Frames behind the newest pushed frame that a boundary may still be reported: the held-back grayscale
        probe, the fade look-back and the wait for a fade after a hard cut, PySceneDetect's window and flash filter."""
        return round(_GRAY_PROBE_S * self.fps) + 2 * (self._max_fade + _ABSORB) + 2 * self._min_len + 8

    @property
    def luma_only(self) -> bool | None:
        """Whether the cut detector scores luma only (None until decided)."""
        return None if self._detector is None else self._luma_only

    def _new_detector(self) -> None:
        cfg = self.cfg
        if cfg.detector == "adaptive":
            self._detector = _Adaptive(adaptive_threshold=cfg.adaptive_threshold, min_scene_len=self._min_len,
                                       min_content_val=cfg.min_content_val, luma_only=self._luma_only, fps=self.fps)
        else:
            self._detector = _Content(threshold=cfg.content_threshold, min_scene_len=self._min_len,
                                             luma_only=self._luma_only)

    def _make_detector(self) -> None:
        if self._auto and self._chroma_nonblack:
            self._luma_only = self._gray_nonblack >= _GRAY_SHARE * self._chroma_nonblack
        self._new_detector()
        held, self._held = self._held, []
        for index, bgr in held:
            self._feed(index, bgr)

    def _maybe_switch(self, index: int) -> None:
        """Follow the footage when it changes between colour and black-and-white (an archive insert in a colour
        documentary): a fresh detector in the other mode, warmed on the last frames, from ``index`` on."""
        run = self._gray_run
        if len(run) < _GRAY_FRAMES or (self._luma_only and any(run)) or (not self._luma_only and not all(run)):
            return
        self._luma_only = not self._luma_only
        self._new_detector()
        self._ignore_before = index
        for i, bgr in zip(self._recent_index, self._recent):
            self._feed(i, bgr)

    def _small_bgr(self, frame_rgb: np.ndarray) -> np.ndarray:
        if frame_rgb.ndim != 3 or frame_rgb.shape[2] != 3 or frame_rgb.dtype != np.uint8:
            raise ValueError(f"frame: expected (H, W, 3) uint8 RGB, got {frame_rgb.shape} {frame_rgb.dtype}")
        h, w = frame_rgb.shape[:2]
        if w > self.cfg.detect_width:
            size = (self.cfg.detect_width, max(1, round(h * self.cfg.detect_width / w)))
            # Bilinear, as PySceneDetect's own downscale does: area averaging costs 5x more per frame and
            # cut detection compares whole-frame colour statistics, which aliasing barely moves.
            frame_rgb = cv2.resize(frame_rgb, size, interpolation=cv2.INTER_LINEAR)
        return cv2.cvtColor(frame_rgb, cv2.COLOR_RGB2BGR)

    def _feed(self, index: int, bgr: np.ndarray) -> None:
        if isinstance(self._detector, _Adaptive):
            cuts = self._detector.process(index, bgr)
        else:
            cuts = [tc.frame_num for tc in self._detector.process_frame(FrameTimecode(index, self.fps), bgr)]
        for c in cuts:
            if c >= self._ignore_before:  # a switched detector's warm-up frames are no new scene
                self._cuts.append(c)
        if index >= self._ignore_before:
            self._fed += 1
            self._fed_luma += self._luma_only

    @property
    def cuts_so_far(self) -> list[int]:
        """Hard cuts PySceneDetect reported so far (before fades absorb the ones at their edges)."""
        return self._cuts

    @property
    def boundaries_so_far(self) -> list[tuple[int, int]]:
        """Final scene boundaries ``(end, start)`` so far, in order; later ones only come after them."""
        return self._boundaries

    # -- per-frame statistics ------------------------------------------------------------------------

    @staticmethod
    def _luma_of(bgr: np.ndarray) -> float:
        b, g, r, _ = cv2.mean(bgr)
        return 0.114 * b + 0.587 * g + 0.299 * r  # BT.601 luma is linear: its mean from the channel means

    def _is_gray(self, bgr: np.ndarray) -> bool:
        """Whether a small frame carries no chroma; ~0.1 ms at 160 px."""
        ycc = cv2.cvtColor(bgr, cv2.COLOR_BGR2YCrCb)
        if self._mid is None or self._mid.shape != ycc.shape:
            self._mid = np.full(ycc.shape, (0, 128, 128), np.uint8)
        # L1 distance from neutral grey over Cr and Cb (Y is 0 in _mid, so subtract its sum back out).
        px = ycc.shape[0] * ycc.shape[1]
        chroma = (cv2.norm(ycc, self._mid, cv2.NORM_L1) - cv2.sumElems(ycc)[0]) / (2 * px)
        return chroma < self.cfg.gray_chroma_max

    def _darker(self, a: float, b: float) -> bool:
        """Whether luma ``b`` is a fade step darker than ``a``."""
        return a > b * (1 + _FADE_REL) + _FADE_ABS

    def _track(self, pos: int, luma: float) -> None:
        black = luma < self.cfg.black_luma
        L = self._luma
        if pos > 0 and not self._darker(L[pos - 1], luma):
            self._steady = pos
        if self._open is None:
            if black:
                start = pos
                # Walk back over the fade-out: frames each notably darker than the one before.
                while (start - 1 > self._floor and pos - (start - 1) <= self._max_fade
                       and self._darker(L[start - 2], L[start - 1])):
                    start -= 1
                self._open = [start, pos, -1, -1]
            return
        t = self._open
        if t[2] < 0:  # inside the black frames
            if not black:
                t[2] = pos
            return
        # Fade-in: frame pos-1 belongs to it when frame pos is notably brighter.
        if pos - t[2] <= self._max_fade and self._darker(L[pos], L[pos - 1]) and not black:
            return
        if black:  # dark again before the fade-in settled: one longer transition
            t[2] = -1
            return
        self._close_transition(pos - 1)  # frame pos-1 is not brightening any more: the scene starts there

    def _close_transition(self, end_pos: int | None) -> None:
        """Close the open transition; its first scene frame is at position ``end_pos`` (None: the video's end)."""
        s, b0, b1, _ = self._open
        self._open = None
        idx = self._index
        end = self._last_index + 1 if end_pos is None else idx[end_pos]
        black_end = self._last_index + 1 if b1 < 0 else idx[b1]
        t = Transition(start=idx[s], black_start=idx[b0], black_end=black_end, end=end)
        self._transitions.append(t)
        self._ready.append((t.start, t.end))
        self._floor = end_pos if end_pos is not None else len(idx)

    def _settle(self, final: bool = False) -> None:
        """Move hard cuts and closed transitions into ``_boundaries`` once nothing earlier can still come."""
        self._pending += [c for c in self._cuts[self._hard_seen:] if 0 < c <= self._last_index]
        self._hard_seen = len(self._cuts)
        keep = []
        for c in self._pending:
            if any(t.start - _ABSORB <= c <= t.end + _ABSORB for t in self._transitions):
                continue  # an edge of a fade or black stretch
            if self._open is not None and c >= self._index[self._open[0]] - _ABSORB:
                keep.append(c)  # inside the open transition: decided when it closes
            elif final or self._last_index - c > self._max_fade + _ABSORB or self._settled_after(c):
                self._ready.append((c, c))
            else:
                keep.append(c)
        self._pending = keep
        # Release in order: nothing before the earliest undecided cut or the open transition may follow.
        horizon = min([*self._pending, self._index[self._open[0]] if self._open else self._last_index + 1])
        if final:
            horizon = self._last_index + 2
        self._ready.sort()
        while self._ready and self._ready[0][0] < horizon:
            b = self._ready.pop(0)
            if not self._boundaries or b[0] >= self._boundaries[-1][1]:
                self._boundaries.append(b)

    def _settled_after(self, c: int) -> bool:
        """Whether no fade-out can still start at hard cut ``c`` (and absorb it): a fade's start is walked back from
        its first black frame over frames each a fade step darker than the one before, so a frame after
        ``c + _ABSORB`` that is not (with no black frame yet, which opens a transition) bounds every later fade's
        start above ``c + _ABSORB``. Without it a cut waited ``max_fade_s`` to be final, and its scene to be scored."""
        return self._steady >= 0 and self._index[self._steady] > c + _ABSORB

    def push_bgr(self, index: int, small_bgr: np.ndarray) -> None:
        """Feed frame ``index`` already reduced to about ``detect_width`` wide, in BGR (the decode path
        that builds it straight from the YUV planes skips a full-size RGB conversion)."""
        if self._finished:
            raise RuntimeError("CutDetector.push after finish(); make a new detector per video")
        if index <= self._last_index:
            raise ValueError(f"frame index: expected > {self._last_index} (strictly increasing), got {index}")
        luma = self._luma_of(small_bgr)
        pos = len(self._index)
        self._index.append(index)
        self._luma.append(luma)
        sampled = pos % _CHROMA_EVERY == 0
        if sampled:
            is_gray = self._is_gray(small_bgr)
            self._chroma_seen += 1
            self._gray_frames += is_gray
        if luma >= self.cfg.black_luma:
            self._nonblack += 1
            if sampled:
                self._chroma_nonblack += 1
                self._gray_nonblack += is_gray
                self._gray_run.append(is_gray)
        self._last_index = index
        if self._detector is None:
            self._held.append((index, small_bgr))
            if self._chroma_nonblack >= _GRAY_FRAMES or len(self._held) >= _GRAY_PROBE_S * self.fps:
                self._make_detector()
        else:
            if self._auto:
                self._maybe_switch(index)
            self._feed(index, small_bgr)
        self._recent.append(small_bgr)
        self._recent_index.append(index)
        del self._recent[:-3], self._recent_index[:-3]
        self._track(pos, luma)
        self._settle()

    def push(self, index: int, frame_rgb: np.ndarray) -> None:
        """Feed frame ``index`` (0-based, strictly increasing) as an (H, W, 3) uint8 RGB array."""
        self.push_bgr(index, self._small_bgr(frame_rgb))

    def finish(self) -> list[int]:
        """Flush the detector's look-behind; return the sorted frames where new scenes start (never 0): hard cuts
        and the middle of every fade or black stretch that has a scene on both sides."""
        if not self._finished and self._last_index >= 0:
            if self._detector is None:
                self._make_detector()
            self._finished = True
            n = self._last_index + 1
            if isinstance(self._detector, AdaptiveDetector):
                # Mirror the last frames (…, f[n-3], f[n-2], f[n-1] | f[n-2], f[n-3]) so the final
                # `window_width` frames get judged against real neighbour scores instead of never.
                tail = self._recent[-2::-1][: self._detector.window_width]
                while len(tail) < self._detector.window_width:
                    tail.append(self._recent[-1])
            else:
                # Repeats score 0, which releases a cut the flash filter is still holding back.
                tail = [self._recent[-1]] * (self._min_len + 1)
            for k, bgr in enumerate(tail):
                self._feed(n + k, bgr)
            if self._open is not None:  # the video ends black or still fading in
                self._close_transition(None)
            self._settle(final=True)
        self._finished = True
        n = self._last_index + 1
        cuts = {a for a, b in self._boundaries if a == b}
        cuts |= {t.cut for t in self._transitions if t.start > 0 and t.end < n}
        return sorted(c for c in cuts if 0 < c < n)

    @property
    def transitions(self) -> list[Transition]:
        """Fades and black stretches found (complete after ``finish``)."""
        return self._transitions

    @property
    def is_grayscale(self) -> bool:
        """Whether the video is black-and-white: its non-black frames (all frames if none) have no chroma."""
        if self._chroma_nonblack:
            return self._gray_nonblack >= _GRAY_SHARE * self._chroma_nonblack
        return self._gray_frames >= _GRAY_SHARE * max(1, self._chroma_seen)

    @property
    def all_black(self) -> bool:
        return bool(self._index) and self._nonblack == 0


@dataclass(frozen=True, slots=True)
class Scenes:
    cuts: list[int]
    transitions: list[Transition]
    boundaries: list[tuple[int, int]]
    is_grayscale: bool


def detect_scenes(frames: Iterable[np.ndarray], fps: float, cfg: SceneCutConfig) -> Scenes:
    """Cuts, fades and grayscale of a sequence of (H, W, 3) uint8 RGB frames."""
    det = CutDetector(cfg, fps)
    for i, frame in enumerate(frames):
        det.push(i, frame)
    cuts = det.finish()
    return Scenes(cuts, det.transitions, det.boundaries_so_far, det.is_grayscale)


def detect_cuts(frames: Iterable[np.ndarray], fps: float, cfg: SceneCutConfig) -> list[int]:
    """Cuts (0-based frames where a new scene starts) in a sequence of (H, W, 3) uint8 RGB frames."""
    return detect_scenes(frames, fps, cfg).cuts


def clip_spans(cuts: Sequence[int], n_frames: int, fps: float, cfg: SceneCutConfig) -> list[tuple[int, int]]:
    """Turn cuts into clip spans ``[start, end)`` (frame numbers) that respect the clip limits.

    Scenes are ``[0, c1), [c1, c2), …, [ck, n)``. Each loses ``trim_s`` at both ends; what is left
    shorter than ``min_clip_s`` is dropped; what is longer than ``max_clip_s`` is split into the
    fewest equal pieces no longer than ``max_clip_s``. When no equal split keeps every piece at
    least ``min_clip_s`` long (possible only when ``max_clip_s < 2 * min_clip_s``), back-to-back
    pieces of ``max_clip_s`` are taken and the remainder dropped.
    """
    _check_fps(fps)
    if n_frames < 0:
        raise ValueError(f"n_frames: expected >= 0, got {n_frames}")
    trim = round(cfg.trim_s * fps)
    # A tolerance keeps exact multiples (2.0 s at 24 fps = 48 frames) on the right side of the limit.
    min_len = max(1, math.ceil(cfg.min_clip_s * fps - 1e-6))
    max_len = math.floor(cfg.max_clip_s * fps + 1e-6)
    if max_len < min_len:
        raise ValueError(
            f"clip limits min_clip_s={cfg.min_clip_s}, max_clip_s={cfg.max_clip_s} leave no whole-frame "
            f"length at {fps} fps"
        )
    bounds = [0, *sorted({int(c) for c in cuts if 0 < c < n_frames}), n_frames]
    spans: list[tuple[int, int]] = []
    for s, e in zip(bounds, bounds[1:]):
        s, e = s + trim, e - trim
        length = e - s
        if length < min_len:
            continue
        pieces = math.ceil(length / max_len)
        if length // pieces >= min_len:
            edges = [s + round(i * length / pieces) for i in range(pieces + 1)]
            spans += list(zip(edges, edges[1:]))
        else:
            spans += [(s + i * max_len, s + (i + 1) * max_len) for i in range(length // max_len)]
    return spans
