"""3D causal VAE in the shape of the CogVideoX VAE (DESIGN.md section 5).

Read top to bottom: causal convolution -> per-frame GroupNorm -> latent-conditioned SpatialNorm
(decoder) -> residual block -> time/space down- and upsampling -> pixel <-> latent shortcut ->
encoder -> decoder -> the VAE with chunked, tiled encode/decode.

Causality. Every temporal operation looks only backwards: convolutions pad time with copies of
the first frame (or, for a later chunk, with the last frames of the previous chunk, carried in an
explicit cache), temporal downsampling keeps frame 0 apart and averages the following pairs, and
GroupNorm statistics are taken per frame. CogVideoX's encoder gathers GroupNorm statistics over the
whole clip, which lets future frames change the statistics of past ones; per-frame statistics keep
the encoder exactly causal and make chunked encode equal one-shot encode (diffusers' chunked encode
uses per-chunk statistics instead, which is neither).

Time bookkeeping with ``ft = 2 ** temporal_down_levels`` (4 for CogVideoX): ``ft*k + 1`` frames
give ``k + 1`` latent frames. A chunk of ``n`` latent frames is ``1 + ft*(n-1)`` input frames when it
holds frame 0 and ``ft*n`` frames afterwards, so every chunk boundary falls on a latent boundary.

Caches are plain nested dicts passed in and returned (``forward(x, cache) -> (y, cache)``); ``None``
means "this is the first chunk of the clip".
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

Cache = dict[str, Any] | None

CHECKPOINTING = ("none", "block", "chunk")


@dataclass(frozen=True, kw_only=True, slots=True)
class VAEConfig:
    in_channels: int = 3
    """Pixel channels (RGB)."""
    latent_channels: int = 16
    """Channels of the latent; the encoder emits twice as many (mean and log-variance)."""
    channels: tuple[int, ...] = (128, 256, 256, 512)
    """Channels per level; every level but the last halves H and W (4 levels -> 8x)."""
    num_res_blocks: int = 3
    """Residual blocks per encoder level (the decoder uses one more, as CogVideoX does)."""
    norm_groups: int = 32
    """GroupNorm groups; must divide every channel count."""
    temporal_down_levels: int = 2
    """The first N downsampling levels also halve time (2 -> 4x temporal compression)."""
    chunk_latent_frames: int = 2
    """Latent frames per temporal chunk in encode/decode; 0 runs the whole clip at once."""
    checkpointing: str = "none"
    """Activation checkpointing while training: "none", "block" (each residual block) or
    "chunk" (each temporal chunk; memory then stays near one chunk's activations)."""
    tile_size: int = 0
    """Spatial tile in pixels for encode()/decode() of large frames; 0 disables tiling."""
    tile_overlap: int = 32
    """Overlap between spatial tiles in pixels (blended linearly)."""
    shortcut: bool = True
    """Parameter-free pixel <-> latent shortcut (see ``pixels_to_latent``): the encoder adds each latent
    cell's mean colour to the posterior mean and the decoder adds the latent's colour back, so the
    network learns only the residual."""

    def __post_init__(self) -> None:
        if len(self.channels) < 1:
            raise ValueError(f"VAEConfig.channels: expected at least one level, got {self.channels}")
        for c in self.channels:
            if c % self.norm_groups:
                raise ValueError(f"VAEConfig: norm_groups={self.norm_groups} must divide every channel count, got {c}")
        if not 0 <= self.temporal_down_levels <= len(self.channels) - 1:
            raise ValueError(
                f"VAEConfig.temporal_down_levels: expected 0..{len(self.channels) - 1}, got {self.temporal_down_levels}"
            )
        if self.checkpointing not in CHECKPOINTING:
            raise ValueError(f"VAEConfig.checkpointing: expected one of {CHECKPOINTING}, got {self.checkpointing!r}")
        if self.chunk_latent_frames < 0:
            raise ValueError(f"VAEConfig.chunk_latent_frames: expected >= 0, got {self.chunk_latent_frames}")
        if self.tile_size and (self.tile_size % self.spatial_factor or self.tile_overlap % self.spatial_factor):
            raise ValueError(
                f"VAEConfig: tile_size and tile_overlap must be multiples of {self.spatial_factor}, "
                f"got {self.tile_size} and {self.tile_overlap}"
            )
        if self.tile_size and not 0 <= self.tile_overlap < self.tile_size:
            raise ValueError(f"VAEConfig.tile_overlap: expected 0 <= overlap < tile_size, got {self.tile_overlap}")

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.channels) - 1)

    @property
    def temporal_factor(self) -> int:
        return 2**self.temporal_down_levels


VAE_PRESETS: dict[str, VAEConfig] = {
    # A training step on a 17x64x64 clip takes well under a second on one CPU core.
    "tiny": VAEConfig(channels=(16, 32, 32, 64), num_res_blocks=1, norm_groups=8),
    # The published architecture: the parameter-free shortcut is our addition (it is what lets the tiny
    # preset generalise in a few hundred CPU steps), so it is opt-in here via [model] shortcut = true.
    "cogvideox": VAEConfig(channels=(128, 256, 256, 512), num_res_blocks=3, norm_groups=32, shortcut=False),
}


def vae_config(preset: str, **overrides: Any) -> VAEConfig:
    """The named preset with ``overrides`` applied (e.g. ``checkpointing="chunk"``)."""
    if preset not in VAE_PRESETS:
        raise KeyError(f"unknown VAE preset {preset!r}; expected one of {sorted(VAE_PRESETS)}")
    return dataclasses.replace(VAE_PRESETS[preset], **overrides)


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------


class CausalConv3d(nn.Module):
    """Conv3d that sees only the current and earlier frames.

    Time is padded on the left with ``kernel_t - 1`` copies of the first frame for the first chunk,
    or with the last ``kernel_t - 1`` input frames of the previous chunk (the cache) afterwards.
    Height and width are zero-padded to keep their size.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 3) -> None:
        super().__init__()
        self.time_pad = kernel - 1
        self.conv = nn.Conv3d(in_channels, out_channels, kernel, padding=(0, kernel // 2, kernel // 2))

    def forward(self, x: torch.Tensor, cache: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        # x: (B, C, T, H, W)
        if self.time_pad == 0:
            return self.conv(x), None
        if cache is None:
            pad = x[:, :, :1].expand(-1, -1, self.time_pad, -1, -1)  # (B, C, k-1, H, W)
        else:
            pad = cache
        xp = torch.cat([pad, x], dim=2)  # (B, C, k-1+T, H, W)
        # Clone: a view would pin the whole chunk's padded input for as long as the cache lives,
        # which under chunk checkpointing is every chunk's input for the whole backward.
        return self.conv(xp), xp[:, :, -self.time_pad :].clone()


class FrameGroupNorm(nn.GroupNorm):
    """GroupNorm with statistics per frame, so normalisation never mixes time steps."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        y = x.transpose(1, 2).reshape(b * t, c, h, w)  # (B*T, C, H, W)
        y = super().forward(y)
        return y.reshape(b, t, c, h, w).transpose(1, 2)  # (B, C, T, H, W)


def expand_latent(z: torch.Tensor, frames: int, height: int, width: int, first_chunk: bool) -> torch.Tensor:
    """Nearest-neighbour resample of a latent chunk (B, C, t, h, w) to (B, C, frames, height, width).

    Time follows the causal layout: in the first chunk latent frame 0 stands for pixel frame 0 alone
    and every later latent frame for the next ``r`` frames; later chunks are ``r`` frames per latent.
    A chunk therefore only ever sees its own latents, so chunked decode equals one-shot decode.
    """
    t = z.shape[2]
    if first_chunk:
        r = (frames - 1) // (t - 1) if t > 1 else 1
        if 1 + r * (t - 1) != frames:
            raise ValueError(f"expand_latent: {t} latent frames cannot cover {frames} frames of a first chunk")
        z = torch.cat([z[:, :, :1], z[:, :, 1:].repeat_interleave(r, dim=2)], dim=2)
    else:
        r = frames // t
        if r * t != frames:
            raise ValueError(f"expand_latent: {t} latent frames cannot cover {frames} frames of a later chunk")
        z = z.repeat_interleave(r, dim=2)
    sh, sw = height // z.shape[3], width // z.shape[4]
    return z.repeat_interleave(sh, dim=3).repeat_interleave(sw, dim=4)  # (B, C, frames, height, width)


class SpatialNorm(nn.Module):
    """Per-frame GroupNorm whose scale and shift come from the latent (CogVideoX's SpatialNorm3D).

    ``norm(f) * conv_y(z) + conv_b(z)`` with 1x1x1 convolutions of the latent, resampled to the
    feature's size. GroupNorm throws away each frame's mean and scale per group, so a plain-GroupNorm
    decoder has to rebuild absolute brightness and colour from relative patterns; the shift path hands
    the latent's low frequencies to every decoder layer. The 1x1 convolutions run at latent resolution
    and are resampled afterwards (the same as resampling first: a 1x1 conv commutes with repetition).
    """

    def __init__(self, channels: int, latent_channels: int, groups: int) -> None:
        super().__init__()
        self.norm = FrameGroupNorm(groups, channels, eps=1e-6)
        self.conv_y = nn.Conv3d(latent_channels, channels, 1)
        self.conv_b = nn.Conv3d(latent_channels, channels, 1)

    def forward(self, f: torch.Tensor, cond: tuple[torch.Tensor, bool]) -> torch.Tensor:
        # f: (B, C, T, H, W); cond: latent chunk (B, latent, t, h, w) and whether it starts the clip
        z, first_chunk = cond
        _, _, t, h, w = f.shape
        scale = expand_latent(self.conv_y(z), t, h, w, first_chunk)  # (B, C, T, H, W)
        shift = expand_latent(self.conv_b(z), t, h, w, first_chunk)  # (B, C, T, H, W)
        return self.norm(f) * scale + shift


class VAEResBlock(nn.Module):
    """Pre-norm residual block of two causal 3x3x3 convolutions.

    With ``latent_channels`` (decoder blocks) both norms are SpatialNorm conditioned on the latent,
    passed to ``forward`` as ``cond``; otherwise plain per-frame GroupNorm (encoder blocks).
    """

    def __init__(self, in_channels: int, out_channels: int, groups: int, latent_channels: int = 0) -> None:
        super().__init__()
        self.conditioned = latent_channels > 0
        self.norm1 = SpatialNorm(in_channels, latent_channels, groups) if self.conditioned else FrameGroupNorm(groups, in_channels, eps=1e-6)
        self.conv1 = CausalConv3d(in_channels, out_channels)
        self.norm2 = SpatialNorm(out_channels, latent_channels, groups) if self.conditioned else FrameGroupNorm(groups, out_channels, eps=1e-6)
        self.conv2 = CausalConv3d(out_channels, out_channels)
        self.skip = nn.Conv3d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def _norm(self, norm: nn.Module, x: torch.Tensor, cond: tuple[torch.Tensor, bool] | None) -> torch.Tensor:
        return norm(x, cond) if self.conditioned else norm(x)

    def forward(self, x: torch.Tensor, cache: Cache, cond: tuple[torch.Tensor, bool] | None = None) -> tuple[torch.Tensor, Cache]:
        cache = cache or {}
        h, c1 = self.conv1(F.silu(self._norm(self.norm1, x, cond)), cache.get("conv1"))
        h, c2 = self.conv2(F.silu(self._norm(self.norm2, h, cond)), cache.get("conv2"))
        return self.skip(x) + h, {"conv1": c1, "conv2": c2}


def _per_frame_2d(conv: nn.Conv2d, x: torch.Tensor, pad: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    b, c, t, h, w = x.shape
    y = x.transpose(1, 2).reshape(b * t, c, h, w)  # (B*T, C, H, W)
    if pad is not None:
        y = F.pad(y, pad)
    y = conv(y)
    return y.reshape(b, t, y.shape[1], y.shape[2], y.shape[3]).transpose(1, 2)  # (B, C', T, H', W')


class VAEDownsample(nn.Module):
    """Halve H and W with a strided conv; optionally halve time keeping frame 0 apart.

    Temporal halving averages frame pairs (1,2), (3,4), ... and passes frame 0 through, so
    2k+1 frames give k+1. The cache only records that frame 0 has been seen: later chunks (an even
    number of frames) are averaged pairwise throughout.
    """

    def __init__(self, channels: int, compress_time: bool) -> None:
        super().__init__()
        self.compress_time = compress_time
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor, cache: Cache) -> tuple[torch.Tensor, Cache]:
        # x: (B, C, T, H, W)
        if self.compress_time:
            first_chunk = cache is None
            head, rest = (x[:, :, :1], x[:, :, 1:]) if first_chunk else (x[:, :, :0], x)
            if rest.shape[2] % 2:
                raise ValueError(
                    f"temporal downsampling expected an even number of frames after the first, got {rest.shape[2]}"
                )
            b, c, t, h, w = rest.shape
            pooled = rest.reshape(b, c, t // 2, 2, h, w).mean(dim=3)  # (B, C, T/2, H, W)
            x = torch.cat([head, pooled], dim=2)
            cache = {"seen_first": True}
        # Asymmetric (right/bottom) padding as in CogVideoX, so H/2 exactly for even H.
        return _per_frame_2d(self.conv, x, pad=(0, 1, 0, 1)), cache


class VAEUpsample(nn.Module):
    """Double H and W (nearest + conv); optionally double time, the mirror of VAEDownsample."""

    def __init__(self, channels: int, compress_time: bool) -> None:
        super().__init__()
        self.compress_time = compress_time
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, cache: Cache) -> tuple[torch.Tensor, Cache]:
        # x: (B, C, T, H, W)
        if self.compress_time:
            first_chunk = cache is None
            head, rest = (x[:, :, :1], x[:, :, 1:]) if first_chunk else (x[:, :, :0], x)
            x = torch.cat([head, rest.repeat_interleave(2, dim=2)], dim=2)  # (B, C, 1+2(T-1) or 2T, H, W)
            cache = {"seen_first": True}
        x = x.repeat_interleave(2, dim=3).repeat_interleave(2, dim=4)  # (B, C, T', 2H, 2W)
        return _per_frame_2d(self.conv, x), cache


class _Stack(nn.Module):
    """Runs named child modules in order, threading each one's cache; optional block checkpointing."""

    def __init__(self, layers: list[tuple[str, nn.Module]]) -> None:
        super().__init__()
        self.names = [n for n, _ in layers]
        self.layers = nn.ModuleDict(dict(layers))
        self.checkpoint_blocks = False

    def forward(self, x: torch.Tensor, cache: Cache, cond: tuple[torch.Tensor, bool] | None = None) -> tuple[torch.Tensor, Cache]:
        cache = cache or {}
        out: dict[str, Any] = {}
        for name in self.names:
            layer = self.layers[name]
            if not isinstance(layer, VAEResBlock):
                x, out[name] = layer(x, cache.get(name))
            elif self.checkpoint_blocks and self.training:
                x, out[name] = checkpoint(layer, x, cache.get(name), cond, use_reentrant=False)
            else:
                x, out[name] = layer(x, cache.get(name), cond)
        return x, out


def pixels_to_latent(x: torch.Tensor, latent_channels: int, spatial: int, temporal: int, first_chunk: bool) -> torch.Tensor:
    """Mean colour of every latent cell, (B, 3, T, H, W) -> (B, latent, t, H/s, W/s); channel k holds colour k % 3.

    This is the residual-autoencoding shortcut of DC-AE (Chen et al. 2024), reduced to the
    encoder and decoder ends: a non-parametric space/time-to-channel path that hands the latent its low
    frequencies. Per-frame GroupNorm discards each frame's absolute brightness and colour, which
    a small VAE then relearns slowly and per training clip (it memorises colours instead of encoding
    them); with the shortcut the network only learns the residual. Time pools causally like the
    encoder: frame 0 alone in the first chunk, then groups of ``temporal`` frames.
    """
    b, c, _, h, w = x.shape
    head, rest = (x[:, :, :1], x[:, :, 1:]) if first_chunk else (x[:, :, :0], x)
    rest = rest.reshape(b, c, rest.shape[2] // temporal, temporal, h, w).mean(dim=3)  # (B, 3, T/r, H, W)
    y = torch.cat([head, rest], dim=2)
    y = F.avg_pool3d(y, (1, spatial, spatial))  # (B, 3, t, H/s, W/s)
    return y[:, [k % c for k in range(latent_channels)]]


def latent_to_pixels(z: torch.Tensor, in_channels: int, frames: int, height: int, width: int, first_chunk: bool) -> torch.Tensor:
    """The decoder end of the shortcut: colour c is the mean of latent channels k with k % 3 == c,
    resampled like ``expand_latent``; (B, latent, t, h, w) -> (B, 3, frames, height, width)."""
    colour = torch.stack([z[:, c::in_channels].mean(dim=1) for c in range(in_channels)], dim=1)  # (B, 3, t, h, w)
    return expand_latent(colour, frames, height, width, first_chunk)


class VAEEncoder(nn.Module):
    """(B, 3, T, H, W) -> moments (B, 2*latent, T', H/8, W/8)."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        ch = cfg.channels
        layers: list[tuple[str, nn.Module]] = [("conv_in", CausalConv3d(cfg.in_channels, ch[0]))]
        c_in = ch[0]
        for level, c_out in enumerate(ch):
            for i in range(cfg.num_res_blocks):
                layers.append((f"down{level}_res{i}", VAEResBlock(c_in, c_out, cfg.norm_groups)))
                c_in = c_out
            if level < len(ch) - 1:
                layers.append((f"down{level}_sample", VAEDownsample(c_in, level < cfg.temporal_down_levels)))
        layers += [
            ("mid_res0", VAEResBlock(c_in, c_in, cfg.norm_groups)),
            ("mid_res1", VAEResBlock(c_in, c_in, cfg.norm_groups)),
        ]
        self.body = _Stack(layers)
        self.norm_out = FrameGroupNorm(cfg.norm_groups, c_in, eps=1e-6)
        self.conv_out = CausalConv3d(c_in, 2 * cfg.latent_channels)
        self.cfg = cfg

    def forward(self, x: torch.Tensor, cache: Cache) -> tuple[torch.Tensor, Cache]:
        # x: (B, 3, T, H, W); a missing cache means this chunk starts the clip
        first_chunk = cache is None
        cache = cache or {}
        h, body_cache = self.body(x, cache.get("body"))  # (B, C_top, T', H/8, W/8)
        moments, out_cache = self.conv_out(F.silu(self.norm_out(h)), cache.get("conv_out"))  # (B, 2*latent, T', h, w)
        if self.cfg.shortcut:
            cfg = self.cfg
            mean, logvar = moments.chunk(2, dim=1)
            mean = mean + pixels_to_latent(x, cfg.latent_channels, cfg.spatial_factor, cfg.temporal_factor, first_chunk)
            moments = torch.cat([mean, logvar], dim=1)
        return moments, {"body": body_cache, "conv_out": out_cache}


class VAEDecoder(nn.Module):
    """(B, latent, T', h, w) -> (B, 3, T, 8h, 8w).

    As in CogVideoX, every norm is a SpatialNorm conditioned on the latent chunk being decoded.
    """

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        ch = cfg.channels
        n = len(ch)
        c_in = ch[-1]
        zc, groups = cfg.latent_channels, cfg.norm_groups
        layers: list[tuple[str, nn.Module]] = [
            ("conv_in", CausalConv3d(zc, c_in)),
            ("mid_res0", VAEResBlock(c_in, c_in, groups, zc)),
            ("mid_res1", VAEResBlock(c_in, c_in, groups, zc)),
        ]
        for level in reversed(range(n)):
            c_out = ch[level]
            for i in range(cfg.num_res_blocks + 1):
                layers.append((f"up{level}_res{i}", VAEResBlock(c_in, c_out, groups, zc)))
                c_in = c_out
            if level > 0:
                # Mirror of the encoder: the upsampler above encoder level L-1 undoes its time halving.
                layers.append((f"up{level}_sample", VAEUpsample(c_in, level - 1 < cfg.temporal_down_levels)))
        self.body = _Stack(layers)
        self.norm_out = SpatialNorm(c_in, zc, groups)
        self.conv_out = CausalConv3d(c_in, cfg.in_channels)
        self.cfg = cfg

    def forward(self, z: torch.Tensor, cache: Cache) -> tuple[torch.Tensor, Cache]:
        # z: (B, latent, t, h, w); a missing cache means this chunk starts the clip
        cond = (z, cache is None)
        cache = cache or {}
        h, body_cache = self.body(z, cache.get("body"), cond)  # (B, C0, T, H, W)
        x, out_cache = self.conv_out(F.silu(self.norm_out(h, cond)), cache.get("conv_out"))  # (B, 3, T, H, W)
        if self.cfg.shortcut:
            x = x + latent_to_pixels(z, self.cfg.in_channels, *x.shape[2:], first_chunk=cond[1])
        return x, {"body": body_cache, "conv_out": out_cache}


# ---------------------------------------------------------------------------------------------
# The VAE: chunked in time, tiled in space
# ---------------------------------------------------------------------------------------------


def latent_frames(frames: int, temporal_factor: int = 4) -> int:
    """Latent frames for a clip of ``frames`` (4k+1 -> k+1); raises when not of that form."""
    if frames < 1 or (frames - 1) % temporal_factor:
        raise ValueError(f"expected {temporal_factor}k+1 frames (1, 17, 161, ...), got {frames}")
    return (frames - 1) // temporal_factor + 1


def time_chunks(frames: int, chunk_latent: int, temporal_factor: int) -> list[tuple[int, int]]:
    """[start, end) frame spans: the first holds frame 0 and ``1 + f*(n-1)`` frames, the rest ``f*n``."""
    latent_frames(frames, temporal_factor)
    if chunk_latent <= 0:
        return [(0, frames)]
    spans = [(0, min(frames, 1 + temporal_factor * (chunk_latent - 1)))]
    while spans[-1][1] < frames:
        start = spans[-1][1]
        spans.append((start, min(frames, start + temporal_factor * chunk_latent)))
    return spans


def latent_chunks(latents: int, chunk_latent: int) -> list[tuple[int, int]]:
    if chunk_latent <= 0:
        return [(0, latents)]
    return [(s, min(latents, s + chunk_latent)) for s in range(0, latents, chunk_latent)]


def _tile_starts(size: int, tile: int, stride: int) -> list[int]:
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, stride)) + [size - tile]
    return sorted(set(starts))


def _ramp(n: int, overlap: int, at_start: bool, at_end: bool, device: torch.device) -> torch.Tensor:
    w = torch.ones(n, device=device)
    if overlap > 0:
        r = (torch.arange(overlap, device=device, dtype=torch.float32) + 1) / (overlap + 1)
        if not at_start:
            w[:overlap] = r
        if not at_end:
            w[-overlap:] = torch.minimum(w[-overlap:], r.flip(0))
    return w


def tiled_apply(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int, overlap: int, scale: float
) -> torch.Tensor:
    """Apply ``fn`` on overlapping spatial tiles of ``x`` (B, C, T, H, W) and blend the outputs.

    ``scale`` is output size / input size (1/8 for encode, 8 for decode). Overlaps are blended
    with linear ramps, which hides seams; the result is close to, not equal to, the untiled one
    because a tile's border sees zero padding instead of its neighbour.
    """
    _, _, _, h, w = x.shape
    stride = tile - overlap
    out: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    ys, xs = _tile_starts(h, tile, stride), _tile_starts(w, tile, stride)
    o_ov = int(overlap * scale)
    for y0 in ys:
        for x0 in xs:
            piece = fn(x[:, :, :, y0 : y0 + tile, x0 : x0 + tile])  # (B, C', T', th*s, tw*s)
            if out is None:
                b, c, t = piece.shape[:3]
                out = piece.new_zeros(b, c, t, int(h * scale), int(w * scale))
                weight = piece.new_zeros(1, 1, 1, int(h * scale), int(w * scale))
            ph, pw = piece.shape[-2:]
            oy, ox = int(y0 * scale), int(x0 * scale)
            wy = _ramp(ph, o_ov, y0 == ys[0], y0 == ys[-1], x.device)
            wx = _ramp(pw, o_ov, x0 == xs[0], x0 == xs[-1], x.device)
            wt = (wy[:, None] * wx[None, :]).to(piece.dtype)  # (ph, pw)
            out[:, :, :, oy : oy + ph, ox : ox + pw] += piece * wt
            weight[:, :, :, oy : oy + ph, ox : ox + pw] += wt
    assert out is not None and weight is not None, "tiled_apply: no tiles"
    return out / weight


class CausalVAE(nn.Module):
    """Causal 3D VAE. ``forward`` is the training path (chunked, optionally checkpointed);
    ``encode``/``decode`` are the inference path (chunked and, for large frames, tiled)."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = VAEEncoder(cfg)
        self.decoder = VAEDecoder(cfg)
        block = cfg.checkpointing == "block"
        self.encoder.body.checkpoint_blocks = block
        self.decoder.body.checkpoint_blocks = block

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight of the decoder's last conv, for the adaptive GAN weight."""
        return self.decoder.conv_out.conv.weight

    def _run_chunks(self, module: nn.Module, x: torch.Tensor, spans: list[tuple[int, int]]) -> torch.Tensor:
        use_ckpt = self.cfg.checkpointing == "chunk" and self.training and torch.is_grad_enabled()
        cache: Cache = None
        outs = []
        for s, e in spans:
            if use_ckpt:
                y, cache = checkpoint(module, x[:, :, s:e], cache, use_reentrant=False)
            else:
                y, cache = module(x[:, :, s:e], cache)
            outs.append(y)
        return torch.cat(outs, dim=2)

    def encode_moments(self, x: torch.Tensor, chunk_latent: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, 4k+1, H, W) in [-1, 1] -> mean, logvar, each (B, 16, k+1, H/8, W/8)."""
        self._check_pixels(x)
        n = self.cfg.chunk_latent_frames if chunk_latent is None else chunk_latent
        moments = self._run_chunks(self.encoder, x, time_chunks(x.shape[2], n, self.cfg.temporal_factor))
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode_latents(self, z: torch.Tensor, chunk_latent: int | None = None) -> torch.Tensor:
        """(B, 16, k+1, h, w) -> (B, 3, 4k+1, 8h, 8w)."""
        if z.ndim != 5 or z.shape[1] != self.cfg.latent_channels:
            raise ValueError(f"expected latents (B, {self.cfg.latent_channels}, T, h, w), got {tuple(z.shape)}")
        n = self.cfg.chunk_latent_frames if chunk_latent is None else chunk_latent
        return self._run_chunks(self.decoder, z, latent_chunks(z.shape[2], n))

    def forward(
        self, x: torch.Tensor, sample: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, 3, T, H, W) -> reconstruction (same shape), posterior mean and logvar."""
        mean, logvar = self.encode_moments(x)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean) if sample else mean
        return self.decode_latents(z), mean, logvar

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Posterior mean for inference; tiles space when frames exceed ``tile_size``."""
        tile = self.cfg.tile_size
        if tile and max(x.shape[-2:]) > tile:
            return tiled_apply(lambda p: self.encode_moments(p)[0], x, tile, self.cfg.tile_overlap, 1 / self.cfg.spatial_factor)
        return self.encode_moments(x)[0]

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        f = self.cfg.spatial_factor
        tile = self.cfg.tile_size // f
        if tile and max(z.shape[-2:]) > tile:
            return tiled_apply(self.decode_latents, z, tile, self.cfg.tile_overlap // f, f)
        return self.decode_latents(z)

    def _check_pixels(self, x: torch.Tensor) -> None:
        f = self.cfg.spatial_factor
        if x.ndim != 5 or x.shape[1] != self.cfg.in_channels:
            raise ValueError(f"expected video (B, {self.cfg.in_channels}, T, H, W), got {tuple(x.shape)}")
        if x.shape[-1] % f or x.shape[-2] % f:
            raise ValueError(f"expected H and W divisible by {f}, got {tuple(x.shape[-2:])}")
        latent_frames(x.shape[2], self.cfg.temporal_factor)


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)) summed over latent elements, averaged over the batch."""
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)
    return kl.flatten(1).sum(dim=1).mean()


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per sample for videos in [-1, 1] (peak-to-peak 2)."""
    mse = (x.float().clamp(-1, 1) - y.float().clamp(-1, 1)).pow(2).flatten(1).mean(dim=1)
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-10))


__all__ = [
    "VAE_PRESETS",
    "CausalConv3d",
    "CausalVAE",
    "SpatialNorm",
    "VAEConfig",
    "expand_latent",
    "kl_divergence",
    "latent_frames",
    "latent_to_pixels",
    "num_params",
    "pixels_to_latent",
    "psnr",
    "tiled_apply",
    "time_chunks",
    "vae_config",
]

