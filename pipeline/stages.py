"""Ray Data stages: thin adapters around the pure scorers and the model wrappers.

Rows flowing through the dataset after the CPU stage have these columns:
  kind      'video' | 'clip' | 'reject'
  uri_key   key of the input file (resume markers)
  record    JSON of the table row (videos / clips / rejects schema, without run_id)
  frames    npz bytes with `frames` (N,H,W,3) uint8 and `times` (N,) for clips that still need model
            stages; empty bytes otherwise
  expect    number of clip rows the input produced (on its 'video' row), so the writer knows when it is whole
  preview   JPEG bytes of the clip's preview strip (clips.preview_jpeg); empty bytes for other rows

A model stage loads its model once in ``__init__`` and maps batches. It only touches clip rows whose
``reject_reasons`` are still empty, so no GPU time goes to clips already dropped; every clip keeps the
scores it got.
"""
from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from pipeline.analyze import ClipResult, VideoResult, _every, iter_analyze, uri_key
from pipeline.settings import CurateConfig


def pack_frames(frames: np.ndarray | None, times: np.ndarray | None) -> bytes:
    if frames is None:
        return b""
    buf = io.BytesIO()
    np.savez(buf, frames=frames, times=times)
    return buf.getvalue()


def unpack_frames(blob: bytes) -> tuple[np.ndarray, np.ndarray]:
    with np.load(io.BytesIO(blob)) as z:
        return z["frames"], z["times"]


def result_rows(res: VideoResult) -> list[dict[str, Any]]:
    key = uri_key(res.uri)
    if res.reject is not None:
        return [{"kind": "reject", "uri_key": key, "record": json.dumps(res.reject), "frames": b"", "expect": 0,
                 "preview": b""}]
    rows = [{"kind": "video", "uri_key": key, "record": json.dumps(res.video), "frames": b"", "expect": len(res.clips),
             "preview": b""}]
    for c in res.clips:
        rows.append({"kind": "clip", "uri_key": key, "record": json.dumps(c.record),
                     "frames": pack_frames(c.frames, c.times), "expect": 0, "preview": c.preview or b""})
    return rows


def analyze_row(row: dict[str, Any], cfg: CurateConfig) -> Iterator[dict[str, Any]]:
    """Ray Data flat_map task: one input file in, its clip rows out as they are scored, then its video or reject
    row, whose ``expect`` counts the clip rows before it (a reject's clips are discarded by the writer).

    ``row["path"]``: the file name's bytes (names need not be UTF-8); else ``row["uri"]``."""
    uri = os.fsdecode(row["path"]) if row.get("path") is not None else row["uri"]
    key = uri_key(uri)
    n = 0
    for item in iter_analyze(uri, cfg.decode, cfg.scenecut, cfg.prefilter):
        if isinstance(item, ClipResult):
            n += 1
            yield {"kind": "clip", "uri_key": key, "record": json.dumps(item.record),
                   "frames": pack_frames(item.frames, item.times), "expect": 0, "preview": item.preview or b""}
        else:
            kind = "reject" if item.reject is not None else "video"
            yield {"kind": kind, "uri_key": key, "record": json.dumps(item.reject if kind == "reject" else item.video),
                   "frames": b"", "expect": n, "preview": b""}


def resolve_device(name: str) -> str:
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class ModelSources:
    """Where each model stage loads from, after stand-ins (if any) have been substituted."""

    watermark: str
    clip_model: str
    clip_pretrained: str
    aesthetic_mlp: str
    caption: Any            # CaptionConfig
    device: str = "auto"
    model_fps: float = 1.0
    prefilter: Any = None   # PrefilterConfig


class ModelStage:
    """Base adapter: decode rows, run ``score`` on the clips still in play, write the record back."""

    name: ClassVar[str]
    version: ClassVar[str] = "1"
    outputs: ClassVar[tuple[str, ...]] = ()

    def __init__(self, sources: ModelSources) -> None:
        self.sources = sources
        self.device = resolve_device(sources.device)
        # Actors get a fraction of a CPU; one intra-op thread each keeps them from fighting the decode tasks.
        if self.device == "cpu":
            import torch

            torch.set_num_threads(max(1, int(os.environ.get("VIDCURATE_ACTOR_THREADS", "1"))))
        self.model_id = "?"

    def score(self, recs: list[dict[str, Any]], frames: list[np.ndarray], times: list[np.ndarray]) -> None:
        raise NotImplementedError

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        live, recs, frames, times = [], [], [], []
        for i, (kind, rec_json, blob) in enumerate(zip(batch["kind"], batch["record"], batch["frames"])):
            if kind != "clip" or not blob:
                continue
            rec = json.loads(rec_json)
            if rec["reject_reasons"]:
                continue
            f, t = unpack_frames(blob)
            live.append(i)
            recs.append(rec)
            frames.append(f)
            times.append(t)
        if not live:
            return batch
        self.score(recs, frames, times)
        records = batch["record"].copy()
        for i, rec in zip(live, recs):
            rec.setdefault("models", {})[self.name] = self.model_id
            rec.setdefault("stage_versions", {})[self.name] = self.version
            records[i] = json.dumps(rec)
        batch["record"] = records
        return batch


class WatermarkStage(ModelStage):
    name = "watermark"
    outputs = ("watermark_prob", "watermark_max")

    def __init__(self, sources: ModelSources) -> None:
        super().__init__(sources)
        from pipeline.models.watermark import load_watermark

        self.model = load_watermark(sources.watermark, device=self.device)
        self.model_id = self.model.model_id

    def score(self, recs, frames, times) -> None:
        cut = self.sources.prefilter.watermark_max
        for rec, f, t in zip(recs, frames, times):
            p = self.model.probs(f[_every(t, self.sources.model_fps)])
            rec["watermark_prob"] = float(np.mean(p))
            rec["watermark_max"] = float(np.max(p))
            if cut is not None and rec["watermark_prob"] > cut:
                rec["reject_reasons"].append("watermark")


class AestheticStage(ModelStage):
    name = "aesthetic"
    outputs = ("aesthetic_mean", "aesthetic_min")

    def __init__(self, sources: ModelSources) -> None:
        super().__init__(sources)
        from pipeline.models.aesthetic import load_aesthetic

        self.model = load_aesthetic(sources.clip_model, sources.clip_pretrained, sources.aesthetic_mlp, device=self.device)
        self.model_id = self.model.model_id

    def score(self, recs, frames, times) -> None:
        cut = self.sources.prefilter.aesthetic_min
        for rec, f, t in zip(recs, frames, times):
            s = self.model.scores(f[_every(t, self.sources.model_fps)])
            rec["aesthetic_mean"] = float(np.mean(s))
            rec["aesthetic_min"] = float(np.min(s))
            if cut is not None and rec["aesthetic_mean"] < cut:
                rec["reject_reasons"].append("low_aesthetic")


class CaptionStage(ModelStage):
    name = "caption"
    outputs = ("caption", "caption_model", "caption_tokens", "caption_latency_s")

    def __init__(self, sources: ModelSources) -> None:
        super().__init__(sources)
        from pipeline.models.captioner import load_captioner

        self.model = load_captioner(sources.caption, device=self.device)
        self.model_id = self.model.model_id

    def score(self, recs, frames, times) -> None:
        from pipeline.models.captioner import CaptionError

        try:
            results = self.model.caption(frames)
        except CaptionError:
            # One clip failed after its retries: caption the batch clip by clip so only that clip loses its caption.
            results = []
            for f in frames:
                try:
                    results.append(self.model.caption([f])[0])
                except CaptionError as err:
                    results.append(err)
        for rec, r in zip(recs, results):
            if isinstance(r, CaptionError):
                rec["reject_reasons"].append(f"caption_failed: {r}"[:300])
                continue
            rec["caption"] = r.caption
            rec["caption_model"] = r.model
            rec["caption_tokens"] = int(r.tokens)
            rec["caption_latency_s"] = float(r.latency_s)
            if not r.caption.strip():
                rec["reject_reasons"].append("empty_caption")


class CaptionQAStage(ModelStage):
    name = "caption_qa"
    outputs = ("caption_similarity",)

    def __init__(self, sources: ModelSources) -> None:
        super().__init__(sources)
        from pipeline.models.clipsim import load_clip_similarity

        self.model = load_clip_similarity(sources.clip_model, sources.clip_pretrained, device=self.device)
        self.model_id = self.model.model_id

    def score(self, recs, frames, times) -> None:
        cut = self.sources.prefilter.caption_similarity_min
        for rec, f, t in zip(recs, frames, times):
            if not rec.get("caption"):
                continue
            rec["caption_similarity"] = float(self.model.similarity(f[_every(t, self.sources.model_fps)], rec["caption"]))
            if cut is not None and rec["caption_similarity"] < cut:
                rec["reject_reasons"].append("caption_mismatch")


class OCRStage(ModelStage):
    """Burned-in text (PP-OCRv4 detection, the weights inside the rapidocr-onnxruntime wheel): never a stand-in."""

    name = "ocr"
    outputs = ("text_area_max", "text_area_mean", "text_boxes", "text_persistent_area", "text_persistent_box",
               "text_mark", "text_mark_confidence", "text_mark_box")

    def __init__(self, sources: ModelSources) -> None:
        super().__init__(sources)
        from pipeline.models.ocr import TextDetector

        self.model = TextDetector(device=self.device)
        self.model_id = self.model.model_id

    def score(self, recs, frames, times) -> None:
        pre = self.sources.prefilter
        for rec, f, t in zip(recs, frames, times):
            # ~1 fps for the per-frame boxes; the mean frame over all the clip's model frames (see models.ocr)
            st = self.model.text_regions(f[_every(t, self.sources.model_fps)], mean_of=f)
            rec["text_area_max"] = st.area_max
            rec["text_area_mean"] = st.area_mean
            rec["text_boxes"] = st.boxes
            rec["text_persistent_area"] = st.persistent_area
            rec["text_persistent_box"] = None if st.persistent_box is None else list(st.persistent_box)
            rec["text_mark"] = st.mark_text or None
            rec["text_mark_confidence"] = st.mark_confidence
            rec["text_mark_box"] = None if st.mark_box is None else list(st.mark_box)
            if pre.text_area_max is not None and st.area_max > pre.text_area_max:
                rec["reject_reasons"].append("text")
            if pre.text_persistent_max is not None and st.persistent_area > pre.text_persistent_max:
                rec["reject_reasons"].append("persistent_text")
            if pre.text_mark_max is not None and st.mark_confidence > pre.text_mark_max:
                rec["reject_reasons"].append("text_mark")


STAGES: dict[str, type[ModelStage]] = {}


def register(cls: type[ModelStage]) -> type[ModelStage]:
    if cls.name in STAGES:
        raise ValueError(f"stage {cls.name!r} is already registered by {STAGES[cls.name].__name__}")
    STAGES[cls.name] = cls
    return cls


for _cls in (OCRStage, WatermarkStage, AestheticStage, CaptionStage, CaptionQAStage):
    register(_cls)

# Columns written by the CPU stage (pipeline.analyze), for the schema check.
ANALYZE_OUTPUTS = (
    "clip_id", "video_id", "start_frame", "end_frame", "start_s", "end_s", "frames", "duration", "fps",
    "width", "height", "is_image", "sharpness_min", "sharpness_low", "sharpness_median", "motion_mean", "motion_max", "pixel_change",
    "overlay_score", "overlay_box", "overlay_clip_score", "overlay_video_score", "overlay_video_box",
    "models", "stage_versions", "reject_reasons", "preview_jpeg",
)


def get_stage(name: str) -> type[ModelStage]:
    try:
        return STAGES[name]
    except KeyError:
        raise KeyError(f"unknown stage {name!r}; known stages: {sorted(STAGES)}") from None
