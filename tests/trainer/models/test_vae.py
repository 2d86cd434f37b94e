"""The causal 3D VAE: shapes, causality, chunked == one-shot, tiling, checkpointing."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trainer.models.vae import (
    VAE_PRESETS,
    CausalConv3d,
    CausalVAE,
    latent_frames,
    latent_to_pixels,
    num_params,
    pixels_to_latent,
    tiled_apply,
    time_chunks,
    vae_config,
)

# Chunked and one-shot runs do the same arithmetic in a different order of convolution calls;
# they differ only by float32 rounding. Measured max |diff| ~1e-6 on outputs of magnitude ~1.
CHUNK_ATOL = 1e-4


@pytest.fixture(scope="module")
def tiny() -> CausalVAE:
    torch.manual_seed(0)
    return CausalVAE(vae_config("tiny")).eval()


@pytest.mark.parametrize(("frames", "latents"), [(1, 1), (17, 5), (161, 41)])
def test_latent_shapes(tiny: CausalVAE, frames: int, latents: int) -> None:
    x = torch.rand(1, 3, frames, 16, 24) * 2 - 1
    with torch.no_grad():
        mean, logvar = tiny.encode_moments(x)
        recon = tiny.decode_latents(mean)
    assert mean.shape == (1, 16, latents, 2, 3)  # spatial /8, 16 latent channels
    assert logvar.shape == mean.shape
    assert recon.shape == x.shape


def test_frame_and_size_validation(tiny: CausalVAE) -> None:
    assert latent_frames(49) == 13
    with pytest.raises(ValueError, match="4k\\+1"):
        tiny.encode_moments(torch.zeros(1, 3, 16, 16, 16))
    with pytest.raises(ValueError, match="divisible by 8"):
        tiny.encode_moments(torch.zeros(1, 3, 17, 20, 16))


def test_cogvideox_preset_matches_published_shape() -> None:
    cfg = VAE_PRESETS["cogvideox"]
    assert cfg.channels == (128, 256, 256, 512)
    assert cfg.num_res_blocks == 3 and cfg.norm_groups == 32 and cfg.latent_channels == 16
    assert cfg.spatial_factor == 8 and cfg.temporal_factor == 4
    assert cfg.shortcut is False  # our mean-colour shortcut is not part of the published model
    model = CausalVAE(cfg)
    assert sum(isinstance(m, torch.nn.GroupNorm) and m.num_groups == 32 for m in model.modules()) > 20
    # The published CogVideoX VAE has ~215M parameters.
    assert 180e6 < num_params(model) < 230e6


def test_causal_conv_pads_with_first_frame_not_the_future() -> None:
    torch.manual_seed(0)
    conv = CausalConv3d(2, 3)
    x = torch.randn(1, 2, 5, 4, 4)
    y, cache = conv(x, None)
    assert y.shape == (1, 3, 5, 4, 4)
    # Output frame 0 equals a conv over three copies of frame 0.
    y0, _ = conv(x[:, :, :1].repeat(1, 1, 3, 1, 1)[:, :, 2:], None)
    torch.testing.assert_close(y[:, :, :1], y0)
    # The cache carries the last two input frames to the next chunk.
    torch.testing.assert_close(cache, x[:, :, -2:])


@pytest.mark.parametrize("t", [0, 4, 8, 12])
def test_encoder_is_causal(tiny: CausalVAE, t: int) -> None:
    """Changing frames after t leaves the latents of frames <= t (latent index t/4) unchanged."""
    torch.manual_seed(1)
    x = torch.rand(1, 3, 17, 16, 16) * 2 - 1
    y = x.clone()
    y[:, :, t + 1 :] = torch.rand_like(y[:, :, t + 1 :]) * 2 - 1
    with torch.no_grad():
        mx, _ = tiny.encode_moments(x, chunk_latent=0)
        my, _ = tiny.encode_moments(y, chunk_latent=0)
    j = t // 4
    torch.testing.assert_close(my[:, :, : j + 1], mx[:, :, : j + 1], rtol=0, atol=0)
    assert (my[:, :, j + 1 :] - mx[:, :, j + 1 :]).abs().max() > 1e-3, "later latents must see the change"


def test_decoder_is_causal(tiny: CausalVAE) -> None:
    torch.manual_seed(2)
    z = torch.randn(1, 16, 5, 2, 2)
    z2 = z.clone()
    z2[:, :, 3:] = torch.randn_like(z2[:, :, 3:])
    with torch.no_grad():
        a, b = tiny.decode_latents(z, 0), tiny.decode_latents(z2, 0)
    # Latent j decodes to frames 4j-3..4j, so latents 0..2 fix frames 0..8.
    torch.testing.assert_close(b[:, :, :9], a[:, :, :9], rtol=0, atol=0)


def test_shortcut_round_trip_gives_each_latent_cells_mean_colour() -> None:
    """pixels -> latent -> pixels through the parameter-free shortcut alone is the mean colour of each
    latent cell (frame 0 alone, then groups of 4 frames; 8x8 pixels), and a later chunk agrees."""
    torch.manual_seed(7)
    x = torch.rand(1, 3, 9, 16, 16) * 2 - 1
    z = pixels_to_latent(x, 16, spatial=8, temporal=4, first_chunk=True)
    assert z.shape == (1, 16, 3, 2, 2)
    y = latent_to_pixels(z, 3, 9, 16, 16, first_chunk=True)
    expected = torch.empty_like(x)
    for t0, t1 in ((0, 1), (1, 5), (5, 9)):
        for i in (0, 8):
            for j in (0, 8):
                cell = x[:, :, t0:t1, i : i + 8, j : j + 8]
                expected[:, :, t0:t1, i : i + 8, j : j + 8] = cell.mean(dim=(2, 3, 4), keepdim=True)
    torch.testing.assert_close(y, expected)
    later = pixels_to_latent(x[:, :, 1:], 16, spatial=8, temporal=4, first_chunk=False)
    torch.testing.assert_close(later, z[:, :, 1:])
    torch.testing.assert_close(latent_to_pixels(later, 3, 8, 16, 16, first_chunk=False), y[:, :, 1:])


def test_time_chunks_align_with_latents() -> None:
    assert time_chunks(17, 2, 4) == [(0, 5), (5, 13), (13, 17)]
    assert time_chunks(161, 0, 4) == [(0, 161)]
    spans = time_chunks(161, 4, 4)
    assert spans[0] == (0, 13) and all((e - s) % 4 == 0 for s, e in spans[1:]) and spans[-1][1] == 161


@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_chunked_equals_one_shot(tiny: CausalVAE, chunk: int) -> None:
    torch.manual_seed(3)
    x = torch.rand(2, 3, 33, 16, 16) * 2 - 1
    with torch.no_grad():
        mean_full, logvar_full = tiny.encode_moments(x, chunk_latent=0)
        mean_chunk, logvar_chunk = tiny.encode_moments(x, chunk_latent=chunk)
        rec_full = tiny.decode_latents(mean_full, chunk_latent=0)
        rec_chunk = tiny.decode_latents(mean_full, chunk_latent=chunk)
    torch.testing.assert_close(mean_chunk, mean_full, rtol=0, atol=CHUNK_ATOL)
    torch.testing.assert_close(logvar_chunk, logvar_full, rtol=0, atol=CHUNK_ATOL)
    torch.testing.assert_close(rec_chunk, rec_full, rtol=0, atol=CHUNK_ATOL)


def test_chunk_checkpointing_gives_the_same_gradients() -> None:
    torch.manual_seed(4)
    plain = CausalVAE(vae_config("tiny", chunk_latent_frames=0)).train()
    ckpt = CausalVAE(vae_config("tiny", chunk_latent_frames=1, checkpointing="chunk")).train()
    block = CausalVAE(vae_config("tiny", chunk_latent_frames=2, checkpointing="block")).train()
    ckpt.load_state_dict(plain.state_dict())
    block.load_state_dict(plain.state_dict())
    x = torch.rand(1, 3, 9, 16, 16) * 2 - 1
    grads = []
    for model in (plain, ckpt, block):
        recon, mean, _ = model(x, sample=False)
        ((recon - x).abs().mean() + mean.pow(2).mean()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(grads[2], grads[0], rtol=1e-3, atol=1e-6)


def test_tiled_apply_blends_tiles_exactly_for_local_ops() -> None:
    """The tiling/blending arithmetic is exact when the op itself is local (no cross-tile context)."""
    x = torch.randn(1, 3, 5, 64, 96)
    encode_like = lambda p: F.avg_pool3d(p, (1, 8, 8))  # noqa: E731  (B, C, T, H/8, W/8)
    torch.testing.assert_close(tiled_apply(encode_like, x, 32, 16, 1 / 8), encode_like(x))
    z = torch.randn(1, 16, 2, 8, 12)
    decode_like = lambda p: p.repeat_interleave(8, -1).repeat_interleave(8, -2)  # noqa: E731
    torch.testing.assert_close(tiled_apply(decode_like, z, 4, 2, 8), decode_like(z))


def test_vae_spatial_tiling_shapes_and_passthrough() -> None:
    """Tiled encode/decode keeps shapes; frames no larger than a tile are not tiled at all.

    Tiled and untiled outputs of the VAE itself are not compared: per-frame GroupNorm takes its
    statistics over the tile, so tiles see different normalisation than the whole frame (the same
    holds for diffusers' CogVideoX tiling); the blending itself is checked exactly above.
    """
    torch.manual_seed(5)
    untiled = CausalVAE(vae_config("tiny")).eval()
    tiled = CausalVAE(vae_config("tiny", tile_size=32, tile_overlap=16)).eval()
    tiled.load_state_dict(untiled.state_dict())
    x = torch.rand(1, 3, 5, 64, 96) * 2 - 1
    z = tiled.encode(x)
    assert z.shape == (1, 16, 2, 8, 12)
    assert tiled.decode(z).shape == x.shape
    small = x[..., :32, :32]
    torch.testing.assert_close(tiled.encode(small), untiled.encode(small))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_autocast_on_cuda_matches_fp32() -> None:
    torch.manual_seed(6)
    model = CausalVAE(vae_config("tiny")).cuda().eval()
    x = (torch.rand(1, 3, 17, 32, 32, device="cuda") * 2 - 1)
    with torch.no_grad():
        ref, _, _ = model(x, sample=False)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low, _, _ = model(x, sample=False)
    assert low.dtype == torch.bfloat16
    assert (low.float() - ref).abs().mean() < 0.05
