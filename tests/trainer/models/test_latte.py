"""Latte's four factorised variants: shapes, parameter counts against a hand count, what each block
mixes (perturbation), image frames kept out of temporal attention, motion-free, S-AdaLN's zero init."""
from __future__ import annotations

import copy

import pytest
import torch

from trainer import diffusion as D
from trainer.models.latte import (
    LATTE_VARIANTS,
    FactorisedHeadsBlock,
    Latte,
    LatteConfig,
    SpatialBlock,
    TemporalBlock,
    latte_config,
    latte_param_count,
)


def _randomised(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random: the zero-initialised S-AdaLN would otherwise close every gate."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.2)
    return module.eval()


def _inputs(cfg: LatteConfig, frames: int = 5, h: int = 8, w: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, frames, cfg.in_channels, h, w, generator=g),
            torch.randn(2, cfg.max_text_len, cfg.text_dim, generator=g), torch.tensor([3, 901]))


def _hand_count(variant: str, *, depth: int, d: int, hd: int, text_dim: int, c: int = 16, p: int = 2) -> int:
    e = d  # Latte's conditioning width is the hidden size
    attn = 4 * (d * d + d) + 4 * hd  # q, k, v, out + per-head QK LayerNorm weight and bias
    ff = d * 4 * d + 4 * d + 4 * d * d + d
    expert = e * 6 * d + 6 * d + 2 * d  # [shift, scale, gate] x {vision, text} + shared LayerNorm
    vision = e * 3 * d + 3 * d + 2 * d
    spatial = 2 * expert + attn + ff
    temporal = 2 * vision + attn + ff
    top = (c * p * p * d + d) + (text_dim * d + d) + (d * e + e + e * e + e) + (e * 2 * d + 2 * d + 2 * d) + (
        d * p * p * c + p * p * c)
    blocks = {
        "interleaved": depth // 2 * (spatial + temporal),
        "late_fusion": depth // 2 * (spatial + temporal),
        "factorised_attention": depth * (2 * expert + vision + 2 * attn + ff),
        "factorised_heads": depth * spatial,
    }[variant]
    return top + blocks


@pytest.mark.parametrize("variant", LATTE_VARIANTS)
def test_latte_s_parameter_count_matches_the_hand_count(variant):
    cfg = latte_config("latte_s", variant=variant)
    assert (cfg.depth, cfg.dim, cfg.num_heads) == (12, 384, 6)
    assert latte_param_count(cfg) == _hand_count(variant, depth=12, d=384, hd=64, text_dim=4096)


def test_presets_have_lattes_published_sizes():
    sizes = {k: (c.depth, c.dim, c.num_heads, c.patch_size, c.mlp_ratio) for k, c in (
        (k, latte_config(k)) for k in ("latte_s", "latte_b", "latte_l", "latte_xl"))}
    assert sizes == {"latte_s": (12, 384, 6, 2, 4), "latte_b": (12, 768, 12, 2, 4),
                     "latte_l": (24, 1024, 16, 2, 4), "latte_xl": (28, 1152, 16, 2, 4)}
    # Latte-XL is 673.68M with class labels; text adds its projection (4096 x 1152) and the spatial
    # blocks' expert text modulation (14 x 6 x 1152^2).
    xl = latte_param_count(latte_config("latte_xl"))
    assert xl == pytest.approx(673.68e6 + 4097 * 1152 + 14 * 6 * 1152 * 1153, rel=0.002)


@pytest.mark.parametrize("variant", LATTE_VARIANTS)
def test_each_variant_keeps_the_latent_shape_and_tiny_count(variant):
    cfg = latte_config("latte_tiny", variant=variant)
    model = _randomised(Latte(cfg))
    latents, text, t = _inputs(cfg, frames=3, h=8, w=12)
    with torch.no_grad():
        y = model(latents, text, t)
    assert y.shape == latents.shape
    assert y.abs().mean() > 0.1
    assert latte_param_count(cfg) == _hand_count(variant, depth=4, d=32, hd=16, text_dim=32)


def _block_inputs(d: int, n_text: int = 3, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 6, d, generator=g)  # (B, F, n, D)
    c = torch.randn(2 * 4, n_text, d, generator=g)  # (B*F, L, D)
    emb = torch.randn(2, d, generator=g)
    return x, c, emb, emb.repeat_interleave(4, dim=0)


def _changed_tokens(block, frame=1, pos=3):
    x, c, emb, emb_f = _block_inputs(block.norm2.norm.normalized_shape[0])
    x2 = x.clone()
    x2[:, frame, pos] += torch.linspace(-1.0, 2.0, x.shape[-1])  # not a constant: LayerNorm would remove it
    with torch.no_grad():
        a, ca = block(x, c, emb, emb_f, 4, None)
        b, cb = block(x2, c, emb, emb_f, 4, None)
    return (b - a).abs().amax(dim=(0, 3)) > 1e-6, (cb - ca).abs().amax(dim=(1, 2)) > 1e-6  # (F, n), (B*F,)


def test_spatial_block_mixes_only_within_a_frame():
    cfg = latte_config("latte_tiny")
    vision, text = _changed_tokens(_randomised(SpatialBlock(cfg)))
    expected = torch.zeros(4, 6, dtype=torch.bool)
    expected[1] = True
    assert torch.equal(vision, expected)
    assert text.tolist() == [False, True, False, False] * 2, "only frame 1's text copy sees frame 1"


def test_temporal_block_mixes_only_across_frames_at_the_same_position():
    cfg = latte_config("latte_tiny")
    vision, text = _changed_tokens(_randomised(TemporalBlock(cfg)))
    expected = torch.zeros(4, 6, dtype=torch.bool)
    expected[:, 3] = True
    assert torch.equal(vision, expected)
    assert not text.any()


def test_split_head_block_mixes_its_frame_and_its_position():
    cfg = latte_config("latte_tiny", variant="factorised_heads")
    vision, _ = _changed_tokens(_randomised(FactorisedHeadsBlock(cfg)))
    expected = torch.zeros(4, 6, dtype=torch.bool)
    expected[1] = True
    expected[:, 3] = True
    assert torch.equal(vision, expected)


@pytest.mark.parametrize("variant", LATTE_VARIANTS)
def test_image_frames_never_reach_temporal_attention(variant):
    cfg = latte_config("latte_tiny", variant=variant)
    model = _randomised(Latte(cfg))
    latents, text, t = _inputs(cfg, frames=5)
    seen = []
    for blk in model.blocks:
        attn = getattr(blk, "attn_t", blk.attn1) if blk.kind != "spatial" else None
        if attn is not None and not isinstance(blk, FactorisedHeadsBlock):
            attn.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape))
    changed = latents.clone()
    changed[:, 3] += 1.0  # an appended image
    with torch.no_grad():
        a = model(latents, text, t, image_frames=2)
        b = model(changed, text, t, image_frames=2)
    if variant != "factorised_heads":
        assert seen and all(s[1] == 3 for s in seen), seen  # (B*n, 3 video frames, D)
    # nothing of the image reaches the video frames or the other image
    torch.testing.assert_close(b[:, [0, 1, 2, 4]], a[:, [0, 1, 2, 4]], rtol=0, atol=1e-6)
    assert (b[:, 3] - a[:, 3]).abs().max() > 1e-2
    # and without image_frames the same frame is part of the video
    with torch.no_grad():
        a, b = model(latents, text, t), model(changed, text, t)
    assert (b[:, :3] - a[:, :3]).abs().max() > 1e-3


@pytest.mark.parametrize("variant", LATTE_VARIANTS)
def test_motion_free_samples_have_independent_frames(variant):
    cfg = latte_config("latte_tiny", variant=variant)
    model = _randomised(Latte(cfg))
    latents, text, t = _inputs(cfg, frames=3)
    changed = latents.clone()
    changed[:, 1] += 1.0
    mf = torch.tensor([True, False])
    with torch.no_grad():
        a, b = model(latents, text, t, motion_free=mf), model(changed, text, t, motion_free=mf)
    torch.testing.assert_close(b[0, [0, 2]], a[0, [0, 2]], rtol=0, atol=1e-6)
    # (late fusion mixes frames only in its last half, so the effect is smaller there; noise is ~1e-7)
    assert (b[1, [0, 2]] - a[1, [0, 2]]).abs().max() > 1e-3, "the ordinary sample's frames still interact"


def test_zero_init_makes_every_block_the_identity():
    cfg = latte_config("latte_tiny")
    torch.manual_seed(0)
    model = Latte(cfg).eval()
    for blk in model.blocks:
        assert not blk.norm1.linear.weight.any() and not blk.norm2.linear.weight.any()
    no_blocks = copy.deepcopy(model)
    no_blocks.blocks = torch.nn.ModuleList()
    no_blocks.first_temporal = -1
    latents, text, t = _inputs(cfg)
    with torch.no_grad():
        y = model(latents, text, t)
        torch.testing.assert_close(y, model(latents, torch.randn_like(text), t))
        # the temporal table is added once, before the first temporal block; with every gate closed the
        # only difference from no blocks at all is that table passing through the final layer
        assert not torch.allclose(y, no_blocks(latents, text, t))


def test_latte_samples_through_the_dit_sampler_and_trains():
    cfg = latte_config("latte_tiny", checkpointing=True)
    model = _randomised(Latte(cfg))
    latents, text, t = _inputs(cfg, frames=3)
    out = D.guided_sample(model, torch.randn_like(latents), text, ac=D.alphas_cumprod(), num_steps=3,
                          guidance=D.GuidanceConfig(scale=7.5, motion_scale=1.2), null_text=torch.zeros(1, 8, 32))
    assert out.x0.shape == latents.shape and torch.isfinite(out.x0).all()
    model.train()
    model(latents, text, t, image_frames=1).square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="variant"):
        LatteConfig(variant="v5")
    with pytest.raises(ValueError, match="depth"):
        latte_config("latte_tiny", depth=3)
    model = Latte(latte_config("latte_tiny"))
    latents, text, t = _inputs(model.cfg, frames=2)
    with pytest.raises(ValueError, match="image_frames"):
        model(latents, text, t, image_frames=2)
    with pytest.raises(ValueError, match="fps"):
        model(latents, text, t, fps=torch.ones(2))
    with pytest.raises(KeyError, match="preset"):
        latte_config("latte_xxl")


def test_latte_from_dit_takes_the_dits_sizes_and_factorised_attention_costs_less():
    from trainer.models.dit import dit_config, flops_per_token
    from trainer.models.latte import latte_flops, latte_from_dit

    dit = dit_config("2b")
    cfg = latte_from_dit(dit, "interleaved")
    assert latte_from_dit(dit, "late_fusion").variant == "late_fusion"
    assert (cfg.depth, cfg.dim, cfg.num_heads, cfg.text_dim, cfg.time_embed_dim) == (30, 1920, 30, 4096, 512)
    # 49 frames at 480x720: 13 x 30 x 45 patches. Full attention over 17,776 tokens against per-frame
    # and per-position sequences: the factorised variants need far fewer attention flops.
    seq = 226 + 13 * 30 * 45
    full = flops_per_token(dit, seq) * seq
    assert full == pytest.approx(0.36e15, rel=0.01)  # anchors/dit.md section 7: ~0.36 PFLOP per sample
    flops = {v: latte_flops(latte_from_dit(dit, v), 13, 30, 45, 226) for v in LATTE_VARIANTS}
    assert flops["interleaved"] == flops["late_fusion"] < full / 2
    # V3 adds a temporal attention to every full block; V4 splits one attention's heads
    assert flops["interleaved"] < flops["factorised_heads"] < flops["factorised_attention"] < full
    with pytest.raises(ValueError, match="patch_size_t"):
        latte_from_dit(dit_config("tiny", patch_size_t=2), "interleaved")
