"""LAION improved aesthetic predictor: a score per frame (about 1–10; 4.5–5.0 typical cutoffs).

Published model: an MLP 768→1024→Dropout(0.2)→128→Dropout(0.2)→64→Dropout(0.1)→16→1 with no
activations, applied to L2-normalised OpenAI CLIP ViT-L/14 image embeddings
(open_clip ``ViT-L-14-quickgelu``, pretrained ``openai``). The released state dict
(``sac+logos+ava1-l14-linearMSE.pth``) uses the keys ``layers.{0,2,4,6,7}.{weight,bias}``.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from pipeline.models import (
    ModelLoadError,
    join_model_ids,
    load_state_dict_file,
    resolve_weights_file,
)
from pipeline.models.clipsim import DEFAULT_CLIP_MODEL, DEFAULT_CLIP_PRETRAINED, ClipBackbone, load_clip

DEFAULT_MLP = "hf://camenduru/improved-aesthetic-predictor/sac+logos+ava1-l14-linearMSE.pth"
MLP_SIZES = (768, 1024, 128, 64, 16, 1)


class AestheticMLP(nn.Module):
    """The published head; attribute and layer order match the released state-dict keys."""

    def __init__(self, input_size: int = MLP_SIZES[0]) -> None:
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.layers(emb)  # (B, 768) -> (B, 1)


class AestheticModel:
    """A loaded CLIP + aesthetic head. ``scores(frames)`` gives one score per frame."""

    def __init__(self, backbone: ClipBackbone, mlp: AestheticMLP, *, model_id: str) -> None:
        if backbone.embed_dim != mlp.input_size:
            raise ModelLoadError(
                f"aesthetic head expects {mlp.input_size}-d CLIP embeddings, but {backbone.model_id} gives {backbone.embed_dim}-d"
            )
        self.backbone = backbone
        self.mlp = mlp.eval()
        self.model_id = model_id

    def embed(self, frames: np.ndarray) -> np.ndarray:
        """``(N, H, W, 3)`` uint8 → ``(N, D)`` L2-normalised CLIP image embeddings (reusable for caption QA)."""
        return self.backbone.embed_images(frames).numpy()

    @torch.inference_mode()
    def scores_from_embeddings(self, embeddings: np.ndarray) -> np.ndarray:
        """``(N, D)`` L2-normalised embeddings → ``(N,)`` float32 scores."""
        emb = torch.as_tensor(embeddings, dtype=torch.float32)
        if emb.ndim != 2 or emb.shape[1] != self.mlp.input_size:
            raise ValueError(f"embeddings: expected shape (N, {self.mlp.input_size}), got {tuple(emb.shape)}")
        return self.mlp(emb)[:, 0].numpy().astype(np.float32)

    def scores(self, frames: np.ndarray) -> np.ndarray:
        """Aesthetic score per frame: ``(N, H, W, 3)`` uint8 → ``(N,)`` float32."""
        return self.scores_from_embeddings(self.embed(frames))


def load_aesthetic_mlp(source: str) -> tuple[AestheticMLP, str]:
    """Load the head from a local state dict or ``hf://owner/repo/file``; returns the head and its id."""
    path = resolve_weights_file(source, what="aesthetic MLP weights")
    state, stored_id = load_state_dict_file(path, what="aesthetic MLP weights")
    weight = state.get("layers.0.weight")
    if weight is None or weight.ndim != 2:
        raise ModelLoadError(f"aesthetic MLP weights {source}: expected key 'layers.0.weight' (1024, 768), got keys {sorted(state)[:8]}")
    mlp = AestheticMLP(input_size=int(weight.shape[1]))
    try:
        mlp.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ModelLoadError(f"aesthetic MLP weights {source}: do not fit the published head {MLP_SIZES}: {err}") from err
    return mlp, stored_id or f"aesthetic-mlp:{source}"


def load_aesthetic(
    clip_model: str = DEFAULT_CLIP_MODEL,
    clip_pretrained: str = DEFAULT_CLIP_PRETRAINED,
    mlp: str = DEFAULT_MLP,
    device: str = "cpu",
) -> AestheticModel:
    """Load CLIP (shared per process with caption QA) and the aesthetic head."""
    head, head_id = load_aesthetic_mlp(mlp)
    backbone = load_clip(clip_model, clip_pretrained, device)
    return AestheticModel(backbone, head, model_id=join_model_ids(backbone.model_id, head_id))
