"""VAE training losses: reconstruction, KL, perceptual, 3D patch discriminator (hinge), adaptive weight.

Weighting follows the taming/CogVideoX convention where reconstruction and KL are both sums per
sample and KL is weighted ~1e-6. Here reconstruction is a per-pixel mean (so the loss scale does
not depend on clip size) and KL is divided by the same pixel count, which keeps the published
ratio between the two.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True, kw_only=True, slots=True)
class LossConfig:
    recon: str = "l1"
    """Reconstruction loss: "l1" or "mse"."""
    kl_weight: float = 1e-6
    """Weight of KL(posterior || N(0, I)), relative to per-sample summed reconstruction error."""
    perceptual_weight: float = 0.1
    """Weight of the VGG16 perceptual distance (used only when perceptual_weights is set)."""
    perceptual_weights: str = ""
    """Local path to torchvision VGG16 weights (``vgg16-397923af.pth`` or features only); empty = off."""
    disc_start: int = 2000
    """Step at which the adversarial loss and discriminator updates begin."""
    disc_weight: float = 0.5
    """Multiplier on the adaptive adversarial weight."""
    disc_channels: int = 64
    """Width of the first discriminator layer."""
    disc_layers: int = 3
    """Strided layers in the patch discriminator."""
    disc_frames: int = 17
    """The discriminator sees a random window of at most this many frames (bounds memory at 161)."""
    adaptive_weight_on: str = "last_layer"
    """Where the adaptive GAN weight compares gradient norms: "last_layer" (the decoder's last conv
    weight, as in taming/CogVideoX) or "output" (the reconstruction itself). With chunk checkpointing
    "last_layer" re-runs every decoder chunk twice and keeps all recomputed activations alive
    (autograd.grad with retain_graph), which defeats chunking at 161 frames; "output" needs no
    recompute."""

    def __post_init__(self) -> None:
        if self.adaptive_weight_on not in ("last_layer", "output"):
            raise ValueError(
                f"LossConfig.adaptive_weight_on: expected 'last_layer' or 'output', got {self.adaptive_weight_on!r}"
            )
        if self.recon not in ("l1", "mse"):
            raise ValueError(f"LossConfig.recon: expected 'l1' or 'mse', got {self.recon!r}")
        if self.disc_frames < 1:
            raise ValueError(f"LossConfig.disc_frames: expected >= 1, got {self.disc_frames}")


def recon_loss(x: torch.Tensor, recon: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-pixel mean L1 or MSE; x, recon (B, 3, T, H, W)."""
    if kind == "l1":
        return (recon.float() - x.float()).abs().mean()
    return (recon.float() - x.float()).pow(2).mean()


def kl_loss(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) summed over latent elements, averaged over the batch."""
    mean, logvar = mean.float(), logvar.float()
    return (0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)).flatten(1).sum(dim=1).mean()


# ---------------------------------------------------------------------------------------------
# Perceptual loss (VGG16 features, LPIPS-style, on one random frame per clip)
# ---------------------------------------------------------------------------------------------


class VGGPerceptual(nn.Module):
    """Distance between unit-normalised VGG16 features (relu1_2 .. relu5_3), equally weighted.

    This is LPIPS without its learned per-channel linear heads (they are another download); it
    needs only the torchvision VGG16 weights, loaded from a local file.
    """

    _taps = (3, 8, 15, 22, 29)  # indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in vgg16.features

    def __init__(self, features: nn.Sequential) -> None:
        super().__init__()
        self.features = features[: self._taps[-1] + 1].eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # x, y: (N, 3, H, W) in [-1, 1]
        h = torch.cat([x, y]).float()
        h = ((h + 1) / 2 - self.mean) / self.std
        dist = h.new_zeros(())
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in self._taps:
                fx, fy = h.chunk(2)
                fx = fx / (fx.norm(dim=1, keepdim=True) + 1e-10)
                fy = fy / (fy.norm(dim=1, keepdim=True) + 1e-10)
                dist = dist + (fx - fy).pow(2).sum(dim=1).mean()
        return dist


def vgg16_features() -> nn.Sequential:
    """torchvision's VGG16 ``features`` without building its 100M-parameter classifier."""
    # Imported here, not at the top: torchvision's model zoo costs ~2.5 s of import, paid by every process that
    # imports the trainer (each Ray Train worker, jobs.train itself, the DiT stages), and only this loss needs it.
    import torchvision

    vgg = torchvision.models.vgg
    return vgg.make_layers(vgg.cfgs["D"], batch_norm=False)


def load_perceptual(path: str) -> VGGPerceptual | None:
    """VGG16 perceptual loss from a local weights file, or None (and a printed note) when off.

    A configured path that does not exist raises: a typo must not silently turn the loss off.
    """
    if not path:
        print("perceptual loss: OFF (loss.perceptual_weights is empty; set it to a local VGG16 .pth to enable)")
        return None
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"loss.perceptual_weights: expected a VGG16 state dict at {p}, file not found")
    state = torch.load(p, map_location="cpu", weights_only=True)
    features = vgg16_features()
    feat_state = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
    features.load_state_dict(feat_state, strict=True)
    print(f"perceptual loss: ON (VGG16 features from {p})")
    return VGGPerceptual(features)


def random_frames(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One random frame per clip from x and y (B, 3, T, H, W) -> two (B, 3, H, W)."""
    t = torch.randint(0, x.shape[2], (x.shape[0],), device=x.device)
    idx = torch.arange(x.shape[0], device=x.device)
    return x[idx, :, t], y[idx, :, t]


# ---------------------------------------------------------------------------------------------
# 3D patch discriminator with hinge loss
# ---------------------------------------------------------------------------------------------


class PatchDiscriminator3D(nn.Module):
    """PatchGAN over (T, H, W): strided in space only, so 1-frame images pass through too."""

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3) -> None:
        super().__init__()
        groups = 8 if channels % 8 == 0 else 1
        mods: list[nn.Module] = [nn.Conv3d(in_channels, channels, (3, 4, 4), (1, 2, 2), (1, 1, 1)), nn.LeakyReLU(0.2)]
        c = channels
        for i in range(1, layers + 1):
            c_out = channels * min(2**i, 8)
            stride = (1, 2, 2) if i < layers else (1, 1, 1)
            # GroupNorm rather than BatchNorm: no cross-rank statistics, same in DDP and FSDP.
            mods += [nn.Conv3d(c, c_out, (3, 4, 4), stride, (1, 1, 1)), nn.GroupNorm(groups, c_out), nn.LeakyReLU(0.2)]
            c = c_out
        mods.append(nn.Conv3d(c, 1, (3, 4, 4), 1, (1, 1, 1)))
        self.net = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, 1, T, h, w) patch logits


def time_window(x: torch.Tensor, frames: int, start: int) -> torch.Tensor:
    return x[:, :, start : start + frames]


def d_hinge_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean())


def g_hinge_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -logits_fake.float().mean()


def adaptive_weight(nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, max_weight: float = 1e4) -> torch.Tensor:
    """||d nll / d W|| / ||d g_loss / d W|| at ``last_layer`` W (Esser et al., taming).

    W is the decoder's last conv weight, or the reconstruction tensor (see LossConfig.adaptive_weight_on).
    """
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    nll_norm, g_norm = _norm(nll_grad), _norm(g_grad)
    return (nll_norm / (g_norm + 1e-4)).clamp(0.0, max_weight).detach()


def _norm(t: torch.Tensor) -> torch.Tensor:
    # FSDP2 parameters are DTensors: take the norm of the whole tensor, not of this rank's shard.
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.float().norm()
