"""LAION watermark classifier: P(watermark) per frame.

Architecture and preprocessing follow the published LAION-5B detector: timm ``efficientnet_b3a``
(timm >= 0.9 maps that name to ``efficientnet_b3``; same layers, same state-dict keys) with the
classifier replaced by 1536→625→ReLU→Dropout(0.3)→256→ReLU→2, input squashed to 256×256 without
keeping the aspect ratio, ImageNet mean/std, and softmax index 0 = watermark.
Published weights: ``hf://kiriyamaX/laion-watermark/watermark_model_v1.pt`` (a mirror of the
LAION-5B-WatermarkDetection release ``watermark_model_v1.pt``, a plain state dict).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models import (
    ModelLoadError,
    check_frames,
    load_state_dict_file,
    resolve_weights_file,
)

BACKBONE = "efficientnet_b3"  # timm's current name for the published "efficientnet_b3a"
INPUT_SIZE = 256
HEAD_SIZES = (1536, 625, 256, 2)
WATERMARK_INDEX = 0
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_watermark_net() -> nn.Module:
    """The detector's architecture with random weights (no download)."""
    import timm

    net = timm.create_model(BACKBONE, pretrained=False, num_classes=2)
    if net.num_features != HEAD_SIZES[0]:
        raise ModelLoadError(f"timm {BACKBONE}: expected {HEAD_SIZES[0]} pooled features, got {net.num_features}")
    net.classifier = nn.Sequential(
        nn.Linear(HEAD_SIZES[0], HEAD_SIZES[1]),
        nn.ReLU(),
        nn.Dropout(p=0.3),
        nn.Linear(HEAD_SIZES[1], HEAD_SIZES[2]),
        nn.ReLU(),
        nn.Linear(HEAD_SIZES[2], HEAD_SIZES[3]),
    )
    return net


def preprocess_watermark(frames: np.ndarray) -> torch.Tensor:
    """``(N, H, W, 3)`` uint8 → ``(N, 3, 256, 256)`` float, squashed (aspect not kept) and ImageNet-normalised."""
    # torch.tensor copies: frames may be read-only views (Arrow buffers, decoded images).
    x = torch.tensor(frames).permute(0, 3, 1, 2).float().div_(255.0)  # (N, 3, H, W)
    # antialias=True matches the PIL bilinear resize the detector was trained with when shrinking.
    x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", antialias=True, align_corners=False)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


class WatermarkModel:
    """A loaded detector. ``probs(frames)`` gives P(watermark) per frame."""

    def __init__(self, net: nn.Module, *, model_id: str, device: str = "cpu", batch_size: int = 16) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
        self.model_id = model_id
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.net = net.to(self.device).eval()

    @torch.inference_mode()
    def probs(self, frames: np.ndarray) -> np.ndarray:
        """P(watermark) for each frame: ``(N, H, W, 3)`` uint8 → ``(N,)`` float32 in [0, 1]."""
        frames = check_frames(frames)
        out = []
        for start in range(0, len(frames), self.batch_size):
            x = preprocess_watermark(frames[start:start + self.batch_size]).to(self.device)  # (B, 3, 256, 256)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                logits = self.net(x)  # (B, 2)
            out.append(logits.float().softmax(dim=-1)[:, WATERMARK_INDEX].cpu())
        return torch.cat(out).numpy().astype(np.float32)


def load_watermark(source: str, device: str = "cpu", *, batch_size: int = 16) -> WatermarkModel:
    """Load detector weights from a local state dict (.pt/.pth/.safetensors) or ``hf://owner/repo/file``.

    The model id is the id stored in the safetensors metadata when present (stand-ins), else the source.
    """
    path: Path = resolve_weights_file(source, what="watermark weights")
    state, stored_id = load_state_dict_file(path, what="watermark weights")
    net = build_watermark_net()
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as err:  # raised for tensors whose shapes differ
        raise ModelLoadError(f"watermark weights {source}: shapes do not fit the LAION detector: {err}") from err
    if missing or unexpected:
        raise ModelLoadError(
            f"watermark weights {source}: expected the LAION {BACKBONE} detector state dict; "
            f"missing keys {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected keys {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    return WatermarkModel(net, model_id=stored_id or source, device=device, batch_size=batch_size)
