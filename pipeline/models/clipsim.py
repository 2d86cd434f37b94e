"""CLIP backbone (open_clip) and caption–clip similarity.

One backbone per (model, pretrained, device) is kept per process, so the aesthetic scorer and the
caption QA in the same actor share one CLIP. Published setting: ``ViT-L-14-quickgelu`` with
``pretrained="openai"`` (OpenAI weights need QuickGELU).

``clip_model`` is an open_clip model name, or a path to an open_clip model-config JSON, which is
registered with ``open_clip.add_model_config`` under its file stem (how stand-ins and custom
architectures reach every Ray worker). ``clip_pretrained`` is an open_clip tag (``"openai"``),
a local checkpoint file, or ``hf://owner/repo/file``.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from pipeline.models import (
    HF_PREFIX,
    MODEL_ID_KEY,
    ModelLoadError,
    check_frames,
    resolve_weights_file,
)

DEFAULT_CLIP_MODEL = "ViT-L-14-quickgelu"
DEFAULT_CLIP_PRETRAINED = "openai"


@dataclass(frozen=True)
class ClipBackbone:
    """A loaded open_clip model with its eval preprocessing and tokenizer."""

    model: nn.Module
    preprocess: Callable
    tokenizer: Callable
    model_id: str
    embed_dim: int
    device: torch.device
    batch_size: int = 32

    @torch.inference_mode()
    def embed_images(self, frames: np.ndarray | list[np.ndarray]) -> torch.Tensor:
        """Frames ``(N, H, W, 3)`` uint8, or a list of ``(H, W, 3)`` frames of any sizes → ``(N, D)`` float32
        L2-normalised image embeddings (on CPU)."""
        from PIL import Image

        if isinstance(frames, np.ndarray):
            frames = list(check_frames(frames))
        else:
            frames = [check_frames(f, what=f"frames[{i}]")[0] for i, f in enumerate(frames)]
        out = []
        for start in range(0, len(frames), self.batch_size):
            # open_clip's eval transform: resize shorter side, centre crop, CLIP mean/std.
            x = torch.stack([self.preprocess(Image.fromarray(f)) for f in frames[start:start + self.batch_size]])
            x = x.to(self.device)  # (B, 3, S, S)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                emb = self.model.encode_image(x)  # (B, D)
            out.append(emb.float().cpu())
        if not out:
            return torch.zeros(0, self.embed_dim)
        return nn.functional.normalize(torch.cat(out), dim=-1)

    @torch.inference_mode()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """Texts → ``(M, D)`` float32 L2-normalised text embeddings (on CPU); long texts are truncated to the context length."""
        tokens = self.tokenizer(list(texts)).to(self.device)  # (M, context_length)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            emb = self.model.encode_text(tokens)  # (M, D)
        return nn.functional.normalize(emb.float().cpu(), dim=-1)


_BACKBONES: dict[tuple[str, str, str], ClipBackbone] = {}
_BACKBONES_LOCK = threading.Lock()


def _model_name(clip_model: str) -> str:
    """Register a JSON model config with open_clip when given one, and return the open_clip model name."""
    import open_clip

    if clip_model.endswith(".json"):
        path = Path(clip_model).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"clip_model: expected an open_clip model name or an existing config .json, got {clip_model!r}")
        open_clip.add_model_config(path)
        return path.stem
    if clip_model not in open_clip.list_models():
        raise ModelLoadError(
            f"clip_model: {clip_model!r} is not an open_clip model name (e.g. {DEFAULT_CLIP_MODEL!r}) nor a config .json"
        )
    return clip_model


def _pretrained_id(name: str, pretrained: str, checkpoint: Path | None) -> str:
    if checkpoint is not None and checkpoint.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(checkpoint), framework="pt", device="cpu") as fh:
            stored = (fh.metadata() or {}).get(MODEL_ID_KEY)
        if stored:
            return stored
    return f"open_clip:{name}/{pretrained}"


def load_clip(
    clip_model: str = DEFAULT_CLIP_MODEL,
    clip_pretrained: str = DEFAULT_CLIP_PRETRAINED,
    device: str = "cpu",
) -> ClipBackbone:
    """Load (or reuse from this process) an open_clip model for image/text embeddings."""
    key = (clip_model, clip_pretrained, str(device))
    with _BACKBONES_LOCK:
        if key in _BACKBONES:
            return _BACKBONES[key]
        import open_clip

        name = _model_name(clip_model)
        checkpoint: Path | None = None
        pretrained = clip_pretrained
        if clip_pretrained.startswith(HF_PREFIX) or Path(clip_pretrained).expanduser().is_file():
            checkpoint = resolve_weights_file(clip_pretrained, what="clip_pretrained")
            pretrained = str(checkpoint)
        elif "/" in clip_pretrained or clip_pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")):
            raise ModelLoadError(f"clip_pretrained: {clip_pretrained!r} looks like a path but no such file exists")
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained, device=device)
        except (RuntimeError, OSError, ValueError, KeyError) as err:
            raise ModelLoadError(
                f"open_clip {name!r} with pretrained={clip_pretrained!r} could not be loaded "
                f"({type(err).__name__}: {err}); offline machines need a local checkpoint path or a warm HF cache"
            ) from err
        model.eval()
        embed_dim = int(open_clip.get_model_config(name)["embed_dim"])
        backbone = ClipBackbone(
            model=model,
            preprocess=preprocess,
            tokenizer=open_clip.get_tokenizer(name),
            model_id=_pretrained_id(name, clip_pretrained, checkpoint),
            embed_dim=embed_dim,
            device=torch.device(device),
        )
        _BACKBONES[key] = backbone
        return backbone


class ClipSimilarity:
    """Cosine similarity between a caption and a clip's frames in CLIP space (caption QA).

    The score is the mean over frames of cos(image_i, text), in [-1, 1] (not CLIPScore's ×100).
    Texts longer than CLIP's context (77 tokens) are truncated, so long captions are judged on their start.
    """

    def __init__(self, backbone: ClipBackbone) -> None:
        self.backbone = backbone
        self.model_id = backbone.model_id

    def similarity(self, frames: np.ndarray, text: str) -> float:
        """One clip ``(N, H, W, 3)`` uint8 and its caption → mean per-frame cosine similarity."""
        return float(self.similarities([frames], [text])[0])

    def similarities(self, clips: list[np.ndarray], texts: list[str]) -> np.ndarray:
        """A batch of clips and their captions → ``(len(clips),)`` float32 similarities, in input order."""
        if len(clips) != len(texts):
            raise ValueError(f"expected one text per clip, got {len(clips)} clips and {len(texts)} texts")
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"texts[{i}]: expected a non-empty caption, got {text!r}")
        if not clips:
            return np.zeros(0, dtype=np.float32)
        clips = [check_frames(c, what=f"clips[{i}]") for i, c in enumerate(clips)]
        counts = [len(c) for c in clips]
        # Clips may differ in size; CLIP's preprocessing brings every frame to one size.
        images = self.backbone.embed_images([f for c in clips for f in c])  # (sum N, D)
        text_emb = self.backbone.embed_texts(texts)  # (M, D)
        clip_index = torch.repeat_interleave(torch.arange(len(clips)), torch.tensor(counts))  # (sum N,)
        per_frame = (images * text_emb[clip_index]).sum(dim=-1)  # (sum N,)
        sums = torch.zeros(len(clips)).index_add_(0, clip_index, per_frame)
        return (sums / torch.tensor(counts, dtype=torch.float32)).numpy().astype(np.float32)


def load_clip_similarity(
    clip_model: str = DEFAULT_CLIP_MODEL,
    clip_pretrained: str = DEFAULT_CLIP_PRETRAINED,
    device: str = "cpu",
) -> ClipSimilarity:
    """Load the caption-QA scorer; shares the CLIP with :func:`pipeline.models.aesthetic.load_aesthetic` when names match."""
    return ClipSimilarity(load_clip(clip_model, clip_pretrained, device))
