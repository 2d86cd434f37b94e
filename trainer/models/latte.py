"""Latte's factorised spatio-temporal transformers as an alternative to the full-attention DiT
(issue 10 item 2, anchors/dit.md section 4).

Read top to bottom: config and presets -> positional tables -> S-AdaLN -> the spatial, temporal and
split-head attentions -> the four block kinds -> the model (embed, blocks, final layer) -> counts.

The four variants of Latte (arXiv 2401.03048), ``depth`` blocks each:

- ``interleaved`` (V1, Latte's best): spatial and temporal blocks alternate, spatial first.
- ``late_fusion`` (V2): the first depth/2 blocks spatial, the rest temporal.
- ``factorised_attention`` (V3): every block runs spatial attention, then temporal attention, then the FFN.
- ``factorised_heads`` (V4): every block's heads are split, half attending within a frame, half across
  frames at one position; the two halves' outputs are projected by one output Linear, i.e. added.

Tokens are kept as (B, F, n, D): F latent frames of n = h * w patches. A spatial attention runs over
(B*F) sequences of one frame's patches, a temporal one over (B*n) sequences of one position's frames.

Text enters as in the CogVideoX expert transformer: projected to D and prepended to the vision tokens
of every frame's spatial attention, with its own adaLN modulation ("expert" text stream); each frame
carries its own copy of the text stream, (B*F, L, D), so no information crosses frames through the
text. Temporal sub-layers see vision tokens only.

Conditioning is Latte's S-AdaLN: per sub-layer a shift, scale and residual gate from the timestep
embedding, zero-initialised so every block starts as the identity. Positions are fixed sin-cos: 2D per
frame after the patch embedding, and a 1D temporal table added once, before the first temporal
sub-layer. ``image_frames`` trailing frames (Latte's ``use_image_num``: frames of other clips appended
for image-video joint training) pass through spatial sub-layers only: temporal blocks and the temporal
table never see them. GenTron's motion-free switch makes temporal attention the identity (each token
attends to itself, so the output is its own value vector) for the chosen samples.

The forward signature is the DiT's, so the trainer and the samplers take either model.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from trainer.models.dit import (Attention, ExpertAdaLN, FeedForward, FinalAdaLN, TimestepMLP, _sincos_1d,
                                timestep_sinusoid)

LATTE_VARIANTS = ("interleaved", "late_fusion", "factorised_attention", "factorised_heads")


@dataclass(frozen=True, kw_only=True, slots=True)
class LatteConfig:
    variant: str = "interleaved"
    depth: int = 28
    """Blocks. V1/V2: half spatial, half temporal; V3/V4: every block has both."""
    dim: int = 1152
    num_heads: int = 16
    mlp_ratio: int = 4
    patch_size: int = 2
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    max_text_len: int = 226
    time_embed_dim: int = 1152
    """Width of the conditioning vector; Latte's equals the hidden size."""
    norm_eps: float = 1e-6
    use_image_num: int = 0
    """Image frames the loader appends to each clip for joint training (Latte: 8); the model is told per
    call through ``forward(..., image_frames=)``, so sampling (no images) uses the same weights."""
    fps_conditioning: bool = False
    """As the DiT's: the frame rate embedded like the timestep, zero-initialised, added to it."""
    checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.variant not in LATTE_VARIANTS:
            raise ValueError(f"LatteConfig.variant: expected one of {LATTE_VARIANTS}, got {self.variant!r}")
        if self.dim % self.num_heads or (self.dim // self.num_heads) % 2:
            raise ValueError(f"LatteConfig: dim {self.dim} must split into {self.num_heads} heads of even width")
        if self.variant in ("interleaved", "late_fusion") and self.depth % 2:
            raise ValueError(f"LatteConfig.depth: {self.variant} pairs spatial and temporal blocks, got {self.depth}")
        if self.variant == "factorised_heads" and self.num_heads < 2:
            raise ValueError(f"LatteConfig.num_heads: factorised_heads needs >= 2, got {self.num_heads}")
        if self.dim % 4:
            raise ValueError(f"LatteConfig.dim: expected a multiple of 4 (2D sin-cos table), got {self.dim}")
        for name in ("depth", "dim", "num_heads", "mlp_ratio", "patch_size", "in_channels", "out_channels",
                     "text_dim", "time_embed_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"LatteConfig.{name}: expected >= 1, got {getattr(self, name)}")
        if self.use_image_num < 0:
            raise ValueError(f"LatteConfig.use_image_num: expected >= 0, got {self.use_image_num}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


def _latte(depth: int, dim: int, heads: int) -> LatteConfig:
    return LatteConfig(depth=depth, dim=dim, num_heads=heads, time_embed_dim=dim)


# Latte's registry (models/latte.py, anchors/dit.md section 4): S 12/384/6, B 12/768/12, L 24/1024/16,
# XL 28/1152/16, patch 2, MLP ratio 4. Their parameter counts differ from Latte's (32.48M .. 673.68M)
# because text enters through a 4096-wide projection and an expert modulation instead of class labels.
LATTE_PRESETS: dict[str, LatteConfig] = {
    "latte_s": _latte(12, 384, 6),
    "latte_b": _latte(12, 768, 12),
    "latte_l": _latte(24, 1024, 16),
    "latte_xl": _latte(28, 1152, 16),
    # CPU tests: milliseconds per step.
    "latte_tiny": LatteConfig(depth=4, dim=32, num_heads=2, text_dim=32, max_text_len=8, time_embed_dim=32),
}


def latte_config(preset: str, **overrides: Any) -> LatteConfig:
    """The named preset with ``overrides`` applied (e.g. ``variant="late_fusion"``)."""
    if preset not in LATTE_PRESETS:
        raise KeyError(f"unknown Latte preset {preset!r}; expected one of {sorted(LATTE_PRESETS)}")
    return dataclasses.replace(LATTE_PRESETS[preset], **overrides)


# ---------------------------------------------------------------------------------------------
# Positional tables (fixed, functions of the grid)
# ---------------------------------------------------------------------------------------------


def spatial_table(dim: int, rows: int, cols: int, device: torch.device) -> torch.Tensor:
    """Latte's 2D sin-cos table (rows * cols, dim): [row dim/2 | column dim/2], row-major."""
    r = _sincos_1d(dim // 2, torch.arange(rows, dtype=torch.float64, device=device))  # (rows, D/2)
    c = _sincos_1d(dim // 2, torch.arange(cols, dtype=torch.float64, device=device))  # (cols, D/2)
    table = torch.cat([r[:, None].expand(-1, cols, -1), c[None].expand(rows, -1, -1)], dim=-1)
    return table.reshape(rows * cols, dim).float()


def temporal_table(dim: int, frames: int, device: torch.device) -> torch.Tensor:
    """Latte's 1D sin-cos table over frames (frames, dim)."""
    return _sincos_1d(dim, torch.arange(frames, dtype=torch.float64, device=device)).float()


# ---------------------------------------------------------------------------------------------
# S-AdaLN for vision-only (temporal) sub-layers; spatial sub-layers use the DiT's ExpertAdaLN
# ---------------------------------------------------------------------------------------------


class VisionAdaLN(nn.Module):
    """LayerNorm modulated from SiLU(emb) -> [shift, scale, gate], vision tokens only."""

    def __init__(self, time_embed_dim: int, dim: int, eps: float) -> None:
        super().__init__()
        self.linear = nn.Linear(time_embed_dim, 3 * dim)
        self.norm = nn.LayerNorm(dim, eps=eps, elementwise_affine=True)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # x (B, F, n, D), emb (B, E)
        shift, scale, gate = self.linear(F.silu(emb))[:, None, None, :].chunk(3, dim=-1)  # (B, 1, 1, D) each
        return self.norm(x) * (1 + scale) + shift, gate


# ---------------------------------------------------------------------------------------------
# Attentions over the (B, F, n, D) layout
# ---------------------------------------------------------------------------------------------


def spatial_attention(attn: Attention, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per frame, [text copy; frame patches] -> attention. x (B, F, n, D), c (B*F, L, D) -> same shapes."""
    b, f, n, d = x.shape
    n_text = c.shape[1]
    out = attn(torch.cat([c, x.reshape(b * f, n, d)], dim=1), None)  # (B*F, L + n, D)
    return out[:, n_text:].reshape(b, f, n, d), out[:, :n_text]


def temporal_attention(attn: Attention, x: torch.Tensor, motion_free: torch.Tensor | None) -> torch.Tensor:
    """Per position, the frames of ``x`` (B, F, n, D) attend to each other -> (B, F, n, D).

    Motion-free samples get the identity temporal mask: a token attending only to itself returns its own
    value, so their output is to_out(to_v(x)) and no frame sees another.
    """
    b, f, n, d = x.shape
    seq = x.transpose(1, 2).reshape(b * n, f, d)  # (B*n, F, D)
    out = attn(seq, None).reshape(b, n, f, d).transpose(1, 2)  # (B, F, n, D)
    if motion_free is not None:
        own = attn.to_out[0](F.linear(x, attn.to_v.weight, attn.to_v.bias))  # (B, F, n, D)
        out = torch.where(motion_free[:, None, None, None], own, out)
    return out


class SplitHeadAttention(Attention):
    """V4: the first heads // 2 heads attend within a frame (with the text), the others across the video
    frames at one position. One output Linear over the concatenated heads = the sum of each half's
    projected output. Text rows get only the spatial heads (their temporal channels are zero)."""

    def forward_split(self, x: torch.Tensor, c: torch.Tensor, video_frames: int,
                      motion_free: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        b, f, n, d = x.shape
        n_text, hs, hd = c.shape[1], self.heads // 2, self.head_dim
        w = torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight])
        bias = torch.cat([self.to_q.bias, self.to_k.bias, self.to_v.bias])
        seq = torch.cat([c, x.reshape(b * f, n, d)], dim=1)  # (B*F, L + n, D)
        qkv = F.linear(seq, w, bias).view(b * f, n_text + n, 3, self.heads, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B*F, heads, L + n, hd) each
        q, k = self.norm_q(q), self.norm_k(k)
        spatial = F.scaled_dot_product_attention(q[:, :hs], k[:, :hs], v[:, :hs])  # (B*F, hs, L + n, hd)

        def by_position(t: torch.Tensor) -> torch.Tensor:  # (B*F, ht, L+n, hd) vision -> (B, n, ht, F, hd)
            return t[:, :, n_text:].reshape(b, f, -1, n, hd).permute(0, 3, 2, 1, 4)

        tq, tk, tv = by_position(q[:, hs:]), by_position(k[:, hs:]), by_position(v[:, hs:])
        temporal = tv.clone()  # image frames (and motion-free samples) attend only to themselves
        fv = video_frames
        attended = F.scaled_dot_product_attention(tq[..., :fv, :], tk[..., :fv, :], tv[..., :fv, :])
        if motion_free is not None:
            attended = torch.where(motion_free[:, None, None, None, None], tv[..., :fv, :], attended)
        temporal[..., :fv, :] = attended  # (B, n, ht, F, hd)
        temporal = temporal.permute(0, 3, 2, 1, 4).reshape(b * f, -1, n, hd)  # (B*F, ht, n, hd)
        temporal = torch.cat([temporal.new_zeros(b * f, temporal.shape[1], n_text, hd), temporal], dim=2)
        out = torch.cat([spatial, temporal], dim=1)  # (B*F, heads, L + n, hd)
        out = self.to_out[0](out.transpose(1, 2).reshape(b * f, n_text + n, d))  # (B*F, L + n, D)
        return out[:, n_text:].reshape(b, f, n, d), out[:, :n_text]


# ---------------------------------------------------------------------------------------------
# Blocks. Every block maps (x (B, F, n, D), c (B*F, L, D)) -> the same, given emb (B, E).
# ---------------------------------------------------------------------------------------------


def _expert(norm: ExpertAdaLN, x: torch.Tensor, c: torch.Tensor, emb_f: torch.Tensor) -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The DiT's expert adaLN over the per-frame layout: emb_f is emb repeated per frame (B*F, E)."""
    b, f, n, d = x.shape
    nx, nc, gate, c_gate = norm(x.reshape(b * f, n, d), c, emb_f)  # gates (B*F, 1, D)
    return nx.reshape(b, f, n, d), nc, gate.reshape(b, f, 1, d), c_gate


def _ffn(block: nn.Module, x: torch.Tensor, c: torch.Tensor, emb_f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert-modulated shared FFN on text and vision with gated residuals (norm2, ff)."""
    b, f, n, d = x.shape
    nx, nc, gate, c_gate = _expert(block.norm2, x, c, emb_f)
    out = block.ff(torch.cat([nc, nx.reshape(b * f, n, d)], dim=1))  # (B*F, L + n, D)
    n_text = c.shape[1]
    return x + gate * out[:, n_text:].reshape(b, f, n, d), c + c_gate * out[:, :n_text]


class SpatialBlock(nn.Module):
    """Expert S-AdaLN -> per-frame attention over [text; frame] -> gate -> expert S-AdaLN -> FFN -> gate."""

    kind = "spatial"

    def __init__(self, cfg: LatteConfig) -> None:
        super().__init__()
        self.norm1 = ExpertAdaLN(cfg.time_embed_dim, cfg.dim, cfg.norm_eps)
        self.attn1 = Attention(cfg.dim, cfg.num_heads, cfg.head_dim)
        self.norm2 = ExpertAdaLN(cfg.time_embed_dim, cfg.dim, cfg.norm_eps)
        self.ff = FeedForward(cfg.dim)

    def forward(self, x, c, emb, emb_f, video_frames, motion_free):
        nx, nc, gate, c_gate = _expert(self.norm1, x, c, emb_f)
        ax, ac = spatial_attention(self.attn1, nx, nc)
        x, c = x + gate * ax, c + c_gate * ac
        return _ffn(self, x, c, emb_f)


class TemporalBlock(nn.Module):
    """S-AdaLN -> attention across the video frames at each position -> gate -> S-AdaLN -> FFN -> gate.
    Vision only; image frames and the text pass through unchanged."""

    kind = "temporal"

    def __init__(self, cfg: LatteConfig) -> None:
        super().__init__()
        self.norm1 = VisionAdaLN(cfg.time_embed_dim, cfg.dim, cfg.norm_eps)
        self.attn1 = Attention(cfg.dim, cfg.num_heads, cfg.head_dim)
        self.norm2 = VisionAdaLN(cfg.time_embed_dim, cfg.dim, cfg.norm_eps)
        self.ff = FeedForward(cfg.dim)

    def forward(self, x, c, emb, emb_f, video_frames, motion_free):
        video, images = x[:, :video_frames], x[:, video_frames:]  # (B, Fv, n, D), (B, Fi, n, D)
        h, gate = self.norm1(video, emb)
        video = video + gate * temporal_attention(self.attn1, h, motion_free)
        h, gate = self.norm2(video, emb)
        video = video + gate * self.ff(h)
        return torch.cat([video, images], dim=1), c


class FactorisedAttentionBlock(nn.Module):
    """V3: expert S-AdaLN -> spatial attention -> gate -> S-AdaLN -> temporal attention over the video
    frames -> gate -> expert S-AdaLN -> FFN -> gate."""

    kind = "both"

    def __init__(self, cfg: LatteConfig) -> None:
        super().__init__()
        self.norm1 = ExpertAdaLN(cfg.time_embed_dim, cfg.dim, cfg.norm_eps)
        self.attn1 = Attention(cfg.dim, cfg.num_heads, cfg.head_dim)
        self.norm_t = VisionAdaLN(cfg.time_embed_dim, cfg.dim, cfg.norm_eps)
        self.attn_t = Attention(cfg.dim, cfg.num_heads, cfg.head_dim)
        self.norm2 = ExpertAdaLN(cfg.time_embed_dim, cfg.dim, cfg.norm_eps)
        self.ff = FeedForward(cfg.dim)

    def forward(self, x, c, emb, emb_f, video_frames, motion_free):
        nx, nc, gate, c_gate = _expert(self.norm1, x, c, emb_f)
        ax, ac = spatial_attention(self.attn1, nx, nc)
        x, c = x + gate * ax, c + c_gate * ac
        video = x[:, :video_frames]
        h, gate = self.norm_t(video, emb)
        video = video + gate * temporal_attention(self.attn_t, h, motion_free)
        x = torch.cat([video, x[:, video_frames:]], dim=1)
        return _ffn(self, x, c, emb_f)


class FactorisedHeadsBlock(nn.Module):
    """V4: expert S-AdaLN -> split-head attention (spatial heads + temporal heads) -> gate -> expert
    S-AdaLN -> FFN -> gate."""

    kind = "both"

    def __init__(self, cfg: LatteConfig) -> None:
        super().__init__()
        self.norm1 = ExpertAdaLN(cfg.time_embed_dim, cfg.dim, cfg.norm_eps)
        self.attn1 = SplitHeadAttention(cfg.dim, cfg.num_heads, cfg.head_dim)
        self.norm2 = ExpertAdaLN(cfg.time_embed_dim, cfg.dim, cfg.norm_eps)
        self.ff = FeedForward(cfg.dim)

    def forward(self, x, c, emb, emb_f, video_frames, motion_free):
        nx, nc, gate, c_gate = _expert(self.norm1, x, c, emb_f)
        ax, ac = self.attn1.forward_split(nx, nc, video_frames, motion_free)
        x, c = x + gate * ax, c + c_gate * ac
        return _ffn(self, x, c, emb_f)


def block_kinds(cfg: LatteConfig) -> list[type[nn.Module]]:
    """The block class at each depth for the variant."""
    if cfg.variant == "interleaved":
        return [SpatialBlock, TemporalBlock] * (cfg.depth // 2)
    if cfg.variant == "late_fusion":
        return [SpatialBlock] * (cfg.depth // 2) + [TemporalBlock] * (cfg.depth // 2)
    if cfg.variant == "factorised_attention":
        return [FactorisedAttentionBlock] * cfg.depth
    return [FactorisedHeadsBlock] * cfg.depth


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class Latte(nn.Module):
    """forward(latents (B, T, C, H, W), text (B, L, text_dim), timesteps (B,), *, motion_free, fps,
    image_frames) -> v (B, T, C_out, H, W); the last ``image_frames`` of T are appended images."""

    def __init__(self, cfg: LatteConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, p = cfg.dim, cfg.patch_size
        self.patch_embed = nn.Conv2d(cfg.in_channels, d, kernel_size=p, stride=p)  # per frame (Latte's best)
        self.text_proj = nn.Linear(cfg.text_dim, d)
        self.time_embedding = TimestepMLP(d, cfg.time_embed_dim)
        if cfg.fps_conditioning:
            self.ofs_embedding = TimestepMLP(cfg.time_embed_dim, cfg.time_embed_dim)
        self.blocks = nn.ModuleList([kind(cfg) for kind in block_kinds(cfg)])
        self.norm_out = FinalAdaLN(cfg.time_embed_dim, d, cfg.norm_eps)
        self.proj_out = nn.Linear(d, p * p * cfg.out_channels)
        self.first_temporal = next(i for i, blk in enumerate(self.blocks) if blk.kind != "spatial")
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """DiT's basic init: xavier-uniform Linears, zero biases; the patch embedding xavier on its
        flattened weight; every S-AdaLN modulation zero (gates closed: each block is the identity)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embed.weight.view(self.cfg.dim, -1))
        nn.init.zeros_(self.patch_embed.bias)
        for m in self.modules():
            if isinstance(m, (ExpertAdaLN, VisionAdaLN, FinalAdaLN)):
                nn.init.zeros_(m.linear.weight)
                nn.init.zeros_(m.linear.bias)
        if self.cfg.fps_conditioning:
            nn.init.zeros_(self.ofs_embedding.linear_2.weight)
            nn.init.zeros_(self.ofs_embedding.linear_2.bias)

    def forward(self, latents: torch.Tensor, text: torch.Tensor, timesteps: torch.Tensor, *,
                motion_free: torch.Tensor | None = None, fps: torch.Tensor | None = None,
                image_frames: int = 0) -> torch.Tensor:
        cfg = self.cfg
        b, t, c, h, w = latents.shape
        p = cfg.patch_size
        if c != cfg.in_channels or h % p or w % p:
            raise ValueError(f"Latte: expected latents (B, T, {cfg.in_channels}, H, W) with H, W divisible by {p}, "
                             f"got {tuple(latents.shape)}")
        if not 0 <= image_frames < t:
            raise ValueError(f"Latte: expected 0 <= image_frames < T = {t} (at least one video frame), "
                             f"got {image_frames}")
        if text.dim() != 3 or text.shape[0] != b or text.shape[2] != cfg.text_dim:
            raise ValueError(f"Latte: expected text ({b}, L, {cfg.text_dim}), got {tuple(text.shape)}")
        if timesteps.shape != (b,):
            raise ValueError(f"Latte: expected timesteps ({b},), got {tuple(timesteps.shape)}")
        if (fps is not None) != cfg.fps_conditioning or (fps is not None and fps.shape != (b,)):
            raise ValueError(f"Latte: fps_conditioning={cfg.fps_conditioning} expects fps "
                             f"{'(B,)' if cfg.fps_conditioning else 'None'}, got "
                             f"{None if fps is None else tuple(fps.shape)}")
        if motion_free is not None:
            if motion_free.shape != (b,) or motion_free.dtype != torch.bool:
                raise ValueError(f"Latte: expected motion_free ({b},) bool, got {tuple(motion_free.shape)} "
                                 f"{motion_free.dtype}")
        rows, cols, video = h // p, w // p, t - image_frames

        emb = self.time_embedding(timestep_sinusoid(timesteps, cfg.dim).to(latents.dtype))  # (B, E)
        if fps is not None:
            emb = emb + self.ofs_embedding(timestep_sinusoid(fps, cfg.time_embed_dim).to(latents.dtype))
        emb_f = emb.repeat_interleave(t, dim=0)  # (B*T, E): spatial sub-layers run per frame
        x = self.patch_embed(latents.reshape(b * t, c, h, w))  # (B*T, D, rows, cols)
        x = x.flatten(2).transpose(1, 2).reshape(b, t, rows * cols, cfg.dim)  # (B, T, n, D), row-major
        x = x + spatial_table(cfg.dim, rows, cols, x.device).to(x.dtype)
        ctx = self.text_proj(text).repeat_interleave(t, dim=0)  # (B*T, L, D): one text copy per frame

        for i, block in enumerate(self.blocks):
            if i == self.first_temporal:  # the temporal table, once, on the video frames only
                tpos = temporal_table(cfg.dim, video, x.device).to(x.dtype)[None, :, None, :]  # (1, Fv, 1, D)
                x = torch.cat([x[:, :video] + tpos, x[:, video:]], dim=1)
            args = (x, ctx, emb, emb_f, video, motion_free)
            if cfg.checkpointing and self.training and torch.is_grad_enabled():
                x, ctx = checkpoint(block, *args, use_reentrant=False)
            else:
                x, ctx = block(*args)

        x = self.norm_out(x.reshape(b, t * rows * cols, cfg.dim), emb)  # (B, T*n, D)
        x = self.proj_out(x)  # (B, T*n, C_out*p*p), features ordered (C, p, p)
        x = x.reshape(b, t, rows, cols, cfg.out_channels, p, p).permute(0, 1, 4, 2, 5, 3, 6)
        return x.reshape(b, t, cfg.out_channels, h, w)


def latte_from_dit(cfg: Any, variant: str, **overrides: Any) -> LatteConfig:
    """A Latte variant with a DiTConfig's sizes (blocks, width, heads, patch, channels, text and
    conditioning widths, options), so the two attentions are compared at equal depth and width."""
    fields = dict(variant=variant, depth=cfg.num_layers, dim=cfg.dim, num_heads=cfg.num_heads,
                  patch_size=cfg.patch_size, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
                  text_dim=cfg.text_dim, max_text_len=cfg.max_text_len, time_embed_dim=cfg.time_embed_dim,
                  fps_conditioning=cfg.fps_conditioning, checkpointing=cfg.checkpointing)
    if cfg.patch_size_t is not None:
        raise ValueError(f"latte_from_dit: Latte patches frames one by one, got patch_size_t={cfg.patch_size_t}")
    return LatteConfig(**(fields | overrides))


# ---------------------------------------------------------------------------------------------
# Counts
# ---------------------------------------------------------------------------------------------


def latte_flops(cfg: LatteConfig, frames: int, rows: int, cols: int, n_text: int, image_frames: int = 0) -> float:
    """Training (forward + backward) flops of one sample: 6 x matmul parameters x the tokens each meets,
    plus 12 D S^2 per attention over a sequence of S (QK^T and AV, 2 flops per multiply-add, x3 for the
    backward), summed over the per-frame spatial and per-position temporal sequences. The per-sample
    adaLN and timestep MLP are left out, as in trainer.models.dit.flops_per_token."""
    d, n, fv = cfg.dim, rows * cols, frames - image_frames
    s_tok = frames * (n_text + n)  # tokens of the spatial sequences (each frame has its text copy)
    t_tok = fv * n  # tokens of the temporal sequences
    attn_w, ff_w = 4 * d * d, 2 * cfg.mlp_ratio * d * d
    spatial_attn = 6 * attn_w * s_tok + 12 * d * frames * (n_text + n) ** 2
    temporal_attn = 6 * attn_w * t_tok + 12 * d * n * fv**2
    total = 0.0
    for kind in block_kinds(cfg):
        if kind is SpatialBlock:
            total += spatial_attn + 6 * ff_w * s_tok
        elif kind is TemporalBlock:
            total += temporal_attn + 6 * ff_w * t_tok
        elif kind is FactorisedAttentionBlock:
            total += spatial_attn + temporal_attn + 6 * ff_w * s_tok
        else:  # split heads: one set of projections, half the heads on each attention
            total += 6 * attn_w * s_tok + 6 * d * frames * (n_text + n) ** 2 + 6 * d * n * fv**2 + 6 * ff_w * s_tok
    p2c = cfg.patch_size**2
    embed = 6 * (cfg.in_channels * p2c * d + d * p2c * cfg.out_channels) * frames * n + 6 * cfg.text_dim * d * n_text
    return float(total + embed)



@functools.lru_cache(maxsize=32)
def latte_param_count(cfg: LatteConfig) -> int:
    """Parameters of the model, built on the meta device (nothing is allocated)."""
    with torch.device("meta"):
        return sum(p.numel() for p in Latte(cfg).parameters())


__all__ = [
    "LATTE_PRESETS",
    "LATTE_VARIANTS",
    "FactorisedAttentionBlock",
    "FactorisedHeadsBlock",
    "Latte",
    "LatteConfig",
    "SpatialBlock",
    "SplitHeadAttention",
    "TemporalBlock",
    "block_kinds",
    "latte_config",
    "latte_flops",
    "latte_from_dit",
    "latte_param_count",
    "spatial_table",
    "temporal_attention",
    "temporal_table",
]
