"""The CogVideoX expert-transformer DiT (DESIGN.md section 5, anchors/dit.md section 1).

Read top to bottom: config and presets -> positional tables (3D sin-cos, 3D RoPE) -> timestep
embedding -> patch embedding -> expert adaLN -> attention -> feed-forward -> block -> the DiT
(embed, blocks, final norm, unpatchify) -> SAT's init -> flops accounting.

One sequence per sample, ``[text; vision]``: L text tokens from the T5 embeddings, then the latent
patches frame-major (frame, row, column). Both streams share every weight of a block except the
adaptive LayerNorm modulation, which gives text and vision their own shift/scale/gate ("expert
adaLN"); attention is full over the joint sequence and positions enter only the vision tokens.

Module and parameter names and shapes equal diffusers' ``CogVideoXTransformer3DModel``, so
``model.state_dict()`` loads there directly (trainer/export.py writes the folder).
Latents are (B, T, C, H, W) as in diffusers: T latent frames before C channels.

Options of issue 10, off by default and then absent from the computation and the state dict:
GenTron's motion-free switch (``forward(..., motion_free=)``, per sample: frames stop seeing each other,
see ``_frame_local_attention``), CogVideo's frame-rate conditioning (``fps_conditioning``) and the guidance
weight input of a guidance-distilled student (``guidance_conditioning``, Imagen Video; trainer/distill.py).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

POS_EMBEDS = ("sincos", "rope")
GUIDANCE_EMBED_SCALE = 1000.0
"""w -> the sinusoid's argument 1000 w (FLUX.1-dev's guidance embedding), so w in [1, 15] spans the timestep range."""


@dataclass(frozen=True, kw_only=True, slots=True)
class DiTConfig:
    num_layers: int = 30
    num_heads: int = 30
    head_dim: int = 64
    in_channels: int = 16
    """Latent channels of the VAE."""
    out_channels: int = 16
    text_dim: int = 4096
    """Width of the text encoder's embeddings (T5-XXL: 4096)."""
    max_text_len: int = 226
    """Text tokens per sample. The model takes any length; diffusers' sin-cos variant requires this one."""
    time_embed_dim: int = 512
    patch_size: int = 2
    patch_size_t: int | None = None
    """None: per-frame 2D patches (CogVideoX 1.0). 2: 2x2x2 patches through a Linear (CogVideoX 1.5)."""
    patch_bias: bool = True
    """Bias of the per-frame patch Conv2d (the 1.5 patch Linear always has one, as in diffusers)."""
    pos_embed: str = "sincos"
    """"sincos": the 2B's fixed 3D sin-cos table added to the vision tokens. "rope": 3D RoPE on
    the vision queries and keys, head dim split t:h:w = 1/4 : 3/8 : 3/8."""
    sample_height: int = 60
    """Base latent height. RoPE (1.0) maps every grid onto this base grid's coordinates, as diffusers'
    pipeline does; RoPE (1.5) uses integer positions."""
    sample_width: int = 90
    sample_frames: int = 49
    """Base pixel frames; only written to the exported config (diffusers sizes a buffer with it)."""
    temporal_compression: int = 4
    spatial_interpolation_scale: float = 1.875
    """The sin-cos table's spatial positions are (row, column) / this."""
    temporal_interpolation_scale: float = 1.0
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    checkpointing: bool = False
    """Recompute each block in the backward pass (activation checkpointing per block)."""
    fps_conditioning: bool = False
    """CogVideo's frame-rate conditioning: the clip's frame rate, embedded like the timestep (sinusoid of
    width time_embed_dim -> Linear -> SiLU -> Linear, the last zero-initialised), is added to the timestep
    embedding. The module is diffusers' ``ofs_embedding`` (CogVideoX 1.5's extra scalar input, same place,
    same shapes), so an export sets ``ofs_embed_dim`` and diffusers reproduces the output given ``ofs=fps``.
    Off: no such module, the state dict and outputs are the plain DiT's."""
    guidance_conditioning: bool = False
    """The classifier-free guidance weight w as an input (Imagen Video / Meng et al.'s guidance distillation:
    one pass of the student gives the teacher's guided v_u + w (v_c - v_u)). Embedded as FLUX.1-dev's
    guidance-distilled transformer does it, the sinusoid of 1000 w (w = 1 is no guidance), then Linear ->
    SiLU -> Linear with the last zero-initialised, added to the timestep embedding; so a student built from
    a teacher starts at the teacher's conditional prediction. diffusers' CogVideoX has no such input: such a
    model does not export. Off: no such module, the plain DiT."""

    def __post_init__(self) -> None:
        if self.pos_embed not in POS_EMBEDS:
            raise ValueError(f"DiTConfig.pos_embed: expected one of {POS_EMBEDS}, got {self.pos_embed!r}")
        if self.dim % 4:
            raise ValueError(f"DiTConfig: num_heads * head_dim must be divisible by 4, got {self.dim}")
        if self.pos_embed == "rope" and self.head_dim % 16:
            # t:h:w = 1/4 : 3/8 : 3/8 with an even width for each part.
            raise ValueError(f"DiTConfig.head_dim: RoPE needs a multiple of 16, got {self.head_dim}")
        if self.patch_size_t is not None and self.patch_size_t < 1:
            raise ValueError(f"DiTConfig.patch_size_t: expected None or >= 1, got {self.patch_size_t}")
        if self.patch_size_t is not None and self.pos_embed != "rope":
            # As CogVideoX 1.5; diffusers' sin-cos table ignores temporal patches, so no export would match.
            raise ValueError(
                f"DiTConfig: patch_size_t={self.patch_size_t} needs pos_embed='rope', got {self.pos_embed!r}")
        for name in ("num_layers", "num_heads", "head_dim", "in_channels", "out_channels", "text_dim",
                     "time_embed_dim", "patch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"DiTConfig.{name}: expected >= 1, got {getattr(self, name)}")

    @property
    def dim(self) -> int:
        return self.num_heads * self.head_dim


DIT_PRESETS: dict[str, DiTConfig] = {
    # CPU tests: a forward+backward on a 2x8x8 latent takes milliseconds.
    "tiny": DiTConfig(num_layers=2, num_heads=2, head_dim=16, text_dim=32, max_text_len=8, time_embed_dim=32,
                      pos_embed="rope", sample_height=8, sample_width=8),
    # THUDM/CogVideoX-2b transformer/config.json (anchors/dit.md section 1.5): 1,693,783,872 parameters.
    "2b": DiTConfig(num_layers=30, num_heads=30, head_dim=64, pos_embed="sincos"),
    # CogVideoX-5b: 42 layers x 48 heads x 64, RoPE, no sin-cos table: 5,570,283,072 parameters.
    "5b": DiTConfig(num_layers=42, num_heads=48, head_dim=64, pos_embed="rope"),
}


def dit_config(preset: str, **overrides: Any) -> DiTConfig:
    """The named preset with ``overrides`` applied (e.g. ``checkpointing=True``)."""
    if preset not in DIT_PRESETS:
        raise KeyError(f"unknown DiT preset {preset!r}; expected one of {sorted(DIT_PRESETS)}")
    return dataclasses.replace(DIT_PRESETS[preset], **overrides)


# ---------------------------------------------------------------------------------------------
# Positional tables (functions of the latent grid only; never parameters)
# ---------------------------------------------------------------------------------------------


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """(M,) positions -> (M, dim) [sin | cos] with omega_i = 1 / 10000^(i / (dim/2)), in float64."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2.0))
    out = torch.outer(pos.double(), omega)  # (M, dim/2)
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_table(cfg: DiTConfig, frames: int, rows: int, cols: int, device: torch.device) -> torch.Tensor:
    """The 2B's 3D sin-cos table (frames * rows * cols, D), token order frame-major.

    Channels: [time D/4 | column 3D/8 | row 3D/8]. Spatial positions are divided by
    spatial_interpolation_scale (1.875: 480x720 frames give the table of the 256-px stage's scale).
    """
    d = cfg.dim
    t = torch.arange(frames, dtype=torch.float32, device=device) / cfg.temporal_interpolation_scale
    r = torch.arange(rows, dtype=torch.float32, device=device) / cfg.spatial_interpolation_scale
    c = torch.arange(cols, dtype=torch.float32, device=device) / cfg.spatial_interpolation_scale
    emb_t = _sincos_1d(d // 4, t)  # (frames, D/4)
    emb_c = _sincos_1d(3 * d // 8, c)  # (cols, 3D/8)
    emb_r = _sincos_1d(3 * d // 8, r)  # (rows, 3D/8)
    spatial = torch.cat([emb_c[None, :, :].expand(rows, -1, -1), emb_r[:, None, :].expand(-1, cols, -1)], dim=-1)
    table = torch.cat([
        emb_t[:, None, :].expand(-1, rows * cols, -1),  # (frames, rows*cols, D/4)
        spatial.reshape(1, rows * cols, -1).expand(frames, -1, -1),  # (frames, rows*cols, 3D/4)
    ], dim=-1)
    return table.reshape(frames * rows * cols, d).float()


def rope_positions(cfg: DiTConfig, frames: int, rows: int, cols: int, device: torch.device) -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor]:
    """1D positions (frames,), (rows,), (cols,) of the latent grid, float32.

    CogVideoX 1.0 (patch_size_t None): the frame index, and rows/columns mapped onto the base grid
    (sample_height/p x sample_width/p) after a centred aspect-preserving fit, exactly as diffusers'
    pipeline computes ``image_rotary_emb``; on the base grid these are the integer row and column.
    CogVideoX 1.5: integer positions (frame, row, column) at any size.
    """
    t = torch.arange(frames, dtype=torch.float32, device=device)
    if cfg.patch_size_t is not None:
        return t, torch.arange(rows, dtype=torch.float32, device=device), torch.arange(
            cols, dtype=torch.float32, device=device)
    base_h, base_w = cfg.sample_height // cfg.patch_size, cfg.sample_width // cfg.patch_size
    if rows / cols > base_h / base_w:
        fit_h, fit_w = base_h, int(round(base_h / rows * cols))
    else:
        fit_h, fit_w = int(round(base_w / cols * rows)), base_w
    top, left = int(round((base_h - fit_h) / 2.0)), int(round((base_w - fit_w) / 2.0))
    # diffusers' grid: linspace(start, stop * (n - 1) / n, n), with stop the fit's far edge.
    r = torch.linspace(top, (top + fit_h) * (rows - 1) / rows, rows, dtype=torch.float32, device=device)
    c = torch.linspace(left, (left + fit_w) * (cols - 1) / cols, cols, dtype=torch.float32, device=device)
    t = torch.linspace(0, frames * (frames - 1) / frames, frames, dtype=torch.float32, device=device)
    return t, r, c


def rope_table(cfg: DiTConfig, frames: int, rows: int, cols: int, device: torch.device) -> tuple[
        torch.Tensor, torch.Tensor]:
    """cos, sin (frames * rows * cols, head_dim), float32, token order frame-major.

    Per head the channels split [time hd/4 | row 3hd/8 | column 3hd/8]; inside each part channel
    pairs (2i, 2i+1) rotate together at frequency theta^(-2i/d).
    """
    dims = (cfg.head_dim // 4, cfg.head_dim // 8 * 3, cfg.head_dim // 8 * 3)
    cos_parts, sin_parts = [], []
    for d, pos, shape in zip(dims, rope_positions(cfg, frames, rows, cols, device),
                             ((frames, 1, 1), (1, rows, 1), (1, 1, cols))):
        freqs = 1.0 / cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d)
        angle = torch.outer(pos, freqs).repeat_interleave(2, dim=1)  # (n, d): pairs share an angle
        cos_parts.append(angle.cos().reshape(*shape, d).expand(frames, rows, cols, d))
        sin_parts.append(angle.sin().reshape(*shape, d).expand(frames, rows, cols, d))
    n = frames * rows * cols
    return torch.cat(cos_parts, -1).reshape(n, -1), torch.cat(sin_parts, -1).reshape(n, -1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs of x (B, heads, S, hd) by the (S, hd) tables, in float32."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (B, heads, S, hd/2) each
    rotated = torch.stack([-x2, x1], dim=-1).flatten(-2)  # (B, heads, S, hd)
    return (x.float() * cos + rotated * sin).to(x.dtype)


def timestep_sinusoid(t: torch.Tensor, dim: int) -> torch.Tensor:
    """(B,) timesteps -> (B, dim) [cos | sin], frequencies exp(-ln(10000) i / (dim/2)), i < dim/2 (shift 0)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angle = t[:, None].float() * freqs[None, :]  # (B, dim/2)
    return torch.cat([angle.cos(), angle.sin()], dim=-1)


# ---------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------


class TimestepMLP(nn.Module):
    """Sinusoid (width D) -> Linear -> SiLU -> Linear: the conditioning vector (B, time_embed_dim)."""

    def __init__(self, dim: int, time_embed_dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(dim, time_embed_dim)
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)

    def forward(self, t_emb: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(t_emb)))


class PatchEmbed(nn.Module):
    """Latents (B, T, C, H, W) and text (B, L, E) -> tokens [text; vision] (B, L + N, D)."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.p, self.p_t = cfg.patch_size, cfg.patch_size_t
        if cfg.patch_size_t is None:
            self.proj = nn.Conv2d(cfg.in_channels, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size,
                                  bias=cfg.patch_bias)
        else:
            self.proj = nn.Linear(cfg.in_channels * cfg.patch_size**2 * cfg.patch_size_t, cfg.dim)
        self.text_proj = nn.Linear(cfg.text_dim, cfg.dim)

    def forward(self, latents: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        b, t, c, h, w = latents.shape
        p = self.p
        if self.p_t is None:
            x = self.proj(latents.reshape(b * t, c, h, w))  # (B*T, D, H/p, W/p): each frame on its own
            x = x.reshape(b, t, x.shape[1], -1).transpose(2, 3).reshape(b, -1, x.shape[1])  # (B, T*h*w, D)
        else:
            pt = self.p_t
            x = latents.permute(0, 1, 3, 4, 2).reshape(b, t // pt, pt, h // p, p, w // p, p, c)
            x = x.permute(0, 1, 3, 5, 7, 2, 4, 6).flatten(4).flatten(1, 3)  # (B, N, C*pt*p*p), (C, pt, p, p) order
            x = self.proj(x)  # (B, N, D)
        return torch.cat([self.text_proj(text), x], dim=1)  # (B, L + N, D)


class ExpertAdaLN(nn.Module):
    """One shared LayerNorm, modulated separately for vision and text from SiLU(emb) -> 6D.

    Chunk order [shift, scale, gate, text shift, text scale, text gate], as diffusers' and SAT's
    regrouped weights.
    """

    def __init__(self, time_embed_dim: int, dim: int, eps: float) -> None:
        super().__init__()
        self.linear = nn.Linear(time_embed_dim, 6 * dim)
        self.norm = nn.LayerNorm(dim, eps=eps, elementwise_affine=True)

    def forward(self, x: torch.Tensor, c: torch.Tensor, emb: torch.Tensor) -> tuple[
            torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        shift, scale, gate, c_shift, c_scale, c_gate = self.linear(F.silu(emb))[:, None, :].chunk(6, dim=-1)
        x = self.norm(x) * (1 + scale) + shift  # (B, N, D)
        c = self.norm(c) * (1 + c_scale) + c_shift  # (B, L, D)
        return x, c, gate, c_gate  # gates (B, 1, D)


@dataclass(frozen=True, slots=True)
class MotionFree:
    """GenTron's motion-free switch for one forward: which samples (B,) bool, and the layout
    [n_text text tokens; frames x tokens_per_frame vision tokens] of every sequence."""

    mask: torch.Tensor
    n_text: int
    frames: int
    all: bool
    """Every sample is motion-free (no indexing needed)."""


def _frame_local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_text: int, frames: int
                           ) -> torch.Tensor:
    """Attention with the temporal interaction cut: text attends to text, each frame's vision tokens to
    the text and to their own frame. (B, heads, S, hd) in and out.

    Text queries see only text, so the text stream carries nothing from one frame to another across
    blocks; this is the block-diagonal mask of GenTron's identity temporal mask in a joint-attention DiT.
    No mask is built: frames move into the batch dimension, each with its copy of the text keys and
    values, so both calls stay on SDPA's fused (flash / memory-efficient) kernels.
    """
    b, heads, s, hd = q.shape
    n = (s - n_text) // frames  # vision tokens per frame
    kt, vt = k[:, :, :n_text], v[:, :, :n_text]  # (B, heads, L, hd)
    text_out = F.scaled_dot_product_attention(q[:, :, :n_text], kt, vt)  # (B, heads, L, hd)

    def per_frame(x: torch.Tensor) -> torch.Tensor:  # (B, heads, F*n, hd) -> (B*F, heads, n, hd)
        return x.reshape(b, heads, frames, n, hd).transpose(1, 2).reshape(b * frames, heads, n, hd)

    def with_text(text: torch.Tensor, vis: torch.Tensor) -> torch.Tensor:  # -> (B*F, heads, L + n, hd)
        text = text[:, None].expand(b, frames, heads, n_text, hd).reshape(b * frames, heads, n_text, hd)
        return torch.cat([text, per_frame(vis)], dim=2)

    vis_out = F.scaled_dot_product_attention(
        per_frame(q[:, :, n_text:]), with_text(kt, k[:, :, n_text:]), with_text(vt, v[:, :, n_text:]))
    vis_out = vis_out.reshape(b, frames, heads, n, hd).transpose(1, 2).reshape(b, heads, frames * n, hd)
    return torch.cat([text_out, vis_out], dim=2)  # (B, heads, S, hd)


def motion_free_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mf: MotionFree) -> torch.Tensor:
    """Full attention for ordinary samples, frame-local attention for motion-free ones, (B, heads, S, hd).

    A mixed batch is split by index into the two groups, each run on its own path, and scattered back,
    rather than given a (B, S, S) boolean mask (which would also leave the fused SDPA kernels).
    """
    if mf.all:
        return _frame_local_attention(q, k, v, mf.n_text, mf.frames)
    free = mf.mask
    out = torch.empty_like(q)
    out[~free] = F.scaled_dot_product_attention(q[~free], k[~free], v[~free])
    out[free] = _frame_local_attention(q[free], k[free], v[free], mf.n_text, mf.frames)
    return out


class Attention(nn.Module):
    """Full self-attention over the joint sequence, per-head QK LayerNorm, RoPE on the vision slice."""

    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.norm_q = nn.LayerNorm(head_dim, eps=1e-6)
        self.norm_k = nn.LayerNorm(head_dim, eps=1e-6)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def forward(self, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                motion_free: MotionFree | None = None) -> torch.Tensor:
        b, s, _ = h.shape
        # One GEMM for q, k and v; the weights stay three parameters so the names match diffusers.
        w = torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight])
        bias = torch.cat([self.to_q.bias, self.to_k.bias, self.to_v.bias])
        qkv = F.linear(h, w, bias).view(b, s, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, heads, S, hd) each
        q, k = self.norm_q(q), self.norm_k(k)
        if rope is not None:
            cos, sin = rope  # (S, hd): identity (cos 1, sin 0) on the text slots
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if motion_free is None:
            out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, S, hd)
        else:
            out = motion_free_attention(q, k, v, motion_free)
        return self.to_out[0](out.transpose(1, 2).reshape(b, s, -1))  # (B, S, D)


class GeluTanhProj(nn.Module):
    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        # Index 1 is diffusers' (p = 0) dropout; kept as an Identity so the second Linear is "net.2".
        self.net = nn.ModuleList([GeluTanhProj(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class Block(nn.Module):
    """Expert adaLN -> joint attention -> gated residual -> expert adaLN -> shared FFN -> gated residual."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.norm1 = ExpertAdaLN(cfg.time_embed_dim, cfg.dim, cfg.norm_eps)
        self.attn1 = Attention(cfg.dim, cfg.num_heads, cfg.head_dim)
        self.norm2 = ExpertAdaLN(cfg.time_embed_dim, cfg.dim, cfg.norm_eps)
        self.ff = FeedForward(cfg.dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor, emb: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor] | None, motion_free: MotionFree | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        n_text = c.shape[1]
        nx, nc, gate, c_gate = self.norm1(x, c, emb)
        a = self.attn1(torch.cat([nc, nx], dim=1), rope, motion_free)  # (B, L + N, D)
        x = x + gate * a[:, n_text:]
        c = c + c_gate * a[:, :n_text]
        nx, nc, gate, c_gate = self.norm2(x, c, emb)
        f = self.ff(torch.cat([nc, nx], dim=1))  # (B, L + N, D)
        return x + gate * f[:, n_text:], c + c_gate * f[:, :n_text]


class FinalAdaLN(nn.Module):
    """LayerNorm modulated by SiLU(emb) -> [shift, scale] (diffusers' AdaLayerNorm, chunk_dim=1)."""

    def __init__(self, time_embed_dim: int, dim: int, eps: float) -> None:
        super().__init__()
        self.linear = nn.Linear(time_embed_dim, 2 * dim)
        self.norm = nn.LayerNorm(dim, eps=eps, elementwise_affine=True)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        shift, scale = self.linear(F.silu(emb))[:, None, :].chunk(2, dim=-1)
        return self.norm(x) * (1 + scale) + shift


# ---------------------------------------------------------------------------------------------
# The DiT
# ---------------------------------------------------------------------------------------------


class DiT(nn.Module):
    """forward(latents (B, T, C, H, W), text (B, L, text_dim), timesteps (B,)) -> v (B, T, C_out, H, W)."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.patch_embed = PatchEmbed(cfg)
        self.time_embedding = TimestepMLP(d, cfg.time_embed_dim)
        if cfg.fps_conditioning:
            self.ofs_embedding = TimestepMLP(cfg.time_embed_dim, cfg.time_embed_dim)
        if cfg.guidance_conditioning:
            self.guidance_embedding = TimestepMLP(cfg.time_embed_dim, cfg.time_embed_dim)
        self.transformer_blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.num_layers)])
        self.norm_final = nn.LayerNorm(d, eps=cfg.norm_eps, elementwise_affine=True)
        self.norm_out = FinalAdaLN(cfg.time_embed_dim, d, cfg.norm_eps)
        self.proj_out = nn.Linear(d, cfg.patch_size**2 * (cfg.patch_size_t or 1) * cfg.out_channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """SAT's from-scratch init: every adaLN modulation Linear zero (all gates closed, each block
        starts as the identity), xavier-uniform patch and output projections with zero bias. The
        other Linears, which the anchors leave unstated, get N(0, 0.02) and zero bias."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        for m in (self.patch_embed.proj, self.proj_out):
            nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        for m in [blk.norm1 for blk in self.transformer_blocks] + [blk.norm2 for blk in self.transformer_blocks] + [
                self.norm_out]:
            nn.init.zeros_(m.linear.weight)
            nn.init.zeros_(m.linear.bias)
        if self.cfg.fps_conditioning:
            # Open-Sora's fps embedder: the last layer starts at zero, so switching the option on for a
            # trained model starts from that model's outputs.
            nn.init.zeros_(self.ofs_embedding.linear_2.weight)
            nn.init.zeros_(self.ofs_embedding.linear_2.bias)
            # N(0, 0.02) on a unit-amplitude sinusoid scales the hidden pre-activation with
            # sqrt(time_embed_dim): at the tiny width (32) two frame rates differed by ~0.01 in the embedding
            # and after 1000 steps 1 seed of 4 had learned to use them (tests/trainer/test_train_dit_options.py's
            # data). 1/sqrt(fan_in), PyTorch's default Linear scale as in diffusers' TimestepEmbedding, is
            # width-free: 4 of 4 seeds learned by step 1000 (loss 0.27-0.33 true fps vs 0.49-0.53 swapped).
            lin1 = self.ofs_embedding.linear_1
            nn.init.normal_(lin1.weight, std=lin1.in_features ** -0.5)
        if self.cfg.guidance_conditioning:
            nn.init.zeros_(self.guidance_embedding.linear_2.weight)
            nn.init.zeros_(self.guidance_embedding.linear_2.bias)

    def positions(self, frames: int, rows: int, cols: int, n_text: int, device: torch.device) -> Any:
        """The positional input of one shape: an additive (N, D) sin-cos table, or RoPE (cos, sin) of
        shape (L + N, head_dim) with the identity rotation on the text slots."""
        if self.cfg.pos_embed == "sincos":
            return sincos_table(self.cfg, frames, rows, cols, device)
        cos, sin = rope_table(self.cfg, frames, rows, cols, device)
        hd = self.cfg.head_dim
        return (torch.cat([cos.new_ones(n_text, hd), cos]), torch.cat([sin.new_zeros(n_text, hd), sin]))

    def forward(self, latents: torch.Tensor, text: torch.Tensor, timesteps: torch.Tensor, *,
                motion_free: torch.Tensor | None = None, fps: torch.Tensor | None = None,
                guidance: torch.Tensor | None = None) -> torch.Tensor:
        """``motion_free`` (B,) bool: those samples' frames do not see each other (GenTron); None or all
        False is the plain DiT. ``fps`` (B,) frame rates, required with ``fps_conditioning`` and refused
        without it; ``guidance`` (B,) CFG weights likewise with ``guidance_conditioning``."""
        cfg = self.cfg
        b, t, c, h, w = latents.shape
        p, pt = cfg.patch_size, cfg.patch_size_t or 1
        if c != cfg.in_channels or h % p or w % p or t % pt:
            raise ValueError(
                f"DiT: expected latents (B, T, {cfg.in_channels}, H, W) with H, W divisible by {p} and T by {pt}, "
                f"got {tuple(latents.shape)}"
            )
        if text.dim() != 3 or text.shape[0] != b or text.shape[2] != cfg.text_dim:
            raise ValueError(f"DiT: expected text ({b}, L, {cfg.text_dim}), got {tuple(text.shape)}")
        if timesteps.shape != (b,):
            raise ValueError(f"DiT: expected timesteps ({b},), got {tuple(timesteps.shape)}")
        frames, rows, cols, n_text = t // pt, h // p, w // p, text.shape[1]
        if (fps is not None) != cfg.fps_conditioning:
            raise ValueError(f"DiT: fps_conditioning={cfg.fps_conditioning} expects fps "
                             f"{'(B,)' if cfg.fps_conditioning else 'None'}, got "
                             f"{None if fps is None else tuple(fps.shape)}")
        if fps is not None and fps.shape != (b,):
            raise ValueError(f"DiT: expected fps ({b},), got {tuple(fps.shape)}")
        if (guidance is not None) != cfg.guidance_conditioning or (guidance is not None and guidance.shape != (b,)):
            raise ValueError(f"DiT: guidance_conditioning={cfg.guidance_conditioning} expects guidance "
                             f"{f'({b},)' if cfg.guidance_conditioning else 'None'}, got "
                             f"{None if guidance is None else tuple(guidance.shape)}")
        mf = None
        if motion_free is not None:
            if motion_free.shape != (b,) or motion_free.dtype != torch.bool:
                raise ValueError(f"DiT: expected motion_free ({b},) bool, got {tuple(motion_free.shape)} "
                                 f"{motion_free.dtype}")
            n_free = int(motion_free.sum())  # one host sync per forward, not per block
            if n_free:
                mf = MotionFree(motion_free, n_text, frames, all=n_free == b)

        emb = self.time_embedding(timestep_sinusoid(timesteps, cfg.dim).to(latents.dtype))  # (B, time_embed_dim)
        if fps is not None:
            emb = emb + self.ofs_embedding(timestep_sinusoid(fps, cfg.time_embed_dim).to(latents.dtype))
        if guidance is not None:
            w_emb = timestep_sinusoid(guidance.float() * GUIDANCE_EMBED_SCALE, cfg.time_embed_dim)
            emb = emb + self.guidance_embedding(w_emb.to(latents.dtype))
        tokens = self.patch_embed(latents, text)  # (B, L + N, D)
        c_tok, x = tokens[:, :n_text], tokens[:, n_text:]  # (B, L, D), (B, N, D)
        pos = self.positions(frames, rows, cols, n_text, latents.device)
        rope = None
        if cfg.pos_embed == "sincos":
            x = x + pos.to(x.dtype)
        else:
            rope = pos

        for block in self.transformer_blocks:
            if cfg.checkpointing and self.training and torch.is_grad_enabled():
                x, c_tok = checkpoint(block, x, c_tok, emb, rope, mf, use_reentrant=False)
            else:
                x, c_tok = block(x, c_tok, emb, rope, mf)

        x = self.norm_out(self.norm_final(x), emb)  # (B, N, D)
        x = self.proj_out(x)  # (B, N, C_out * pt * p * p), features ordered (C, pt, p, p)
        x = x.reshape(b, frames, rows, cols, cfg.out_channels, pt, p, p)
        x = x.permute(0, 1, 5, 4, 2, 6, 3, 7)  # (B, frames, pt, C, rows, p, cols, p)
        return x.reshape(b, t, cfg.out_channels, h, w)


# ---------------------------------------------------------------------------------------------
# Flops accounting (torchtitan's dense-transformer count, anchors/dit.md section 7)
# ---------------------------------------------------------------------------------------------


def param_counts(cfg: DiTConfig) -> dict[str, int]:
    """Parameter counts of the model, built on the meta device (nothing is allocated).

    ``per_sample``: the timestep MLP and the adaLN modulation Linears, which run once per sample,
    not per token; ``per_token`` is the rest.
    """
    return dict(_param_counts(cfg))


@functools.lru_cache(maxsize=16)
def _param_counts(cfg: DiTConfig) -> tuple[tuple[str, int], ...]:
    with torch.device("meta"):
        model = DiT(cfg)
    total = sum(p.numel() for p in model.parameters())
    per_sample = sum(p.numel() for name, p in model.named_parameters()
                     if name.startswith(("time_embedding.", "ofs_embedding.", "guidance_embedding."))
                     or (".norm" in f".{name}" and ".linear." in name))
    return (("total", total), ("per_sample", per_sample), ("per_token", total - per_sample))


def flops_per_token(cfg: DiTConfig, seq_len: int) -> float:
    """Training (forward + backward) flops per token of a ``seq_len``-token sequence (text + vision):
    6 N over the per-token parameters plus 12 L D S for the two attention matmuls."""
    return 6.0 * param_counts(cfg)["per_token"] + 12.0 * cfg.num_layers * cfg.dim * seq_len


__all__ = [
    "DIT_PRESETS",
    "POS_EMBEDS",
    "DiT",
    "DiTConfig",
    "MotionFree",
    "apply_rope",
    "dit_config",
    "flops_per_token",
    "motion_free_attention",
    "param_counts",
    "rope_positions",
    "rope_table",
    "sincos_table",
    "timestep_sinusoid",
]
