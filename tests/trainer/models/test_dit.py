"""The CogVideoX DiT: parity with diffusers' CogVideoXTransformer3DModel through the exported folder,
positions, text conditioning, expert norms, SAT init, checkpointing, presets and flops."""
from __future__ import annotations

import copy
import dataclasses
import math
import types

import pytest
import torch

from trainer.export import export_diffusers, transformer_config
from trainer.models.dit import (
    DIT_PRESETS,
    DiT,
    DiTConfig,
    dit_config,
    flops_per_token,
    param_counts,
    rope_positions,
    rope_table,
)

diffusers = pytest.importorskip("diffusers")
from diffusers import CogVideoXPipeline, CogVideoXTransformer3DModel  # noqa: E402

# The two implementations do the same float32 operations; measured max |diff| is 0 on outputs ~0.6.
PARITY_ATOL = 1e-4


def _randomised(cfg: DiTConfig, seed: int = 0) -> DiT:
    """A DiT with every parameter random: SAT's init zeroes the adaLN linears, which would close every
    gate and make most of the network invisible to a comparison."""
    torch.manual_seed(seed)
    model = DiT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


def _inputs(cfg: DiTConfig, frames: int, h: int, w: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, frames, cfg.in_channels, h, w, generator=g)  # (B, T, C, H, W)
    text = torch.randn(2, cfg.max_text_len, cfg.text_dim, generator=g)
    return latents, text, torch.tensor([3, 901])


VARIANTS = {
    "sincos": dit_config("tiny", pos_embed="sincos"),
    "rope": dit_config("tiny", pos_embed="rope"),
    "rope-1.5": dit_config("tiny", pos_embed="rope", patch_size_t=2),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> (config, our randomised DiT, diffusers' model loaded from our exported folder)."""
    cache = {}

    def get(name):
        if name not in cache:
            cfg = VARIANTS[name]
            ours = _randomised(cfg)
            out = export_diffusers(cfg, ours.state_dict(), tmp_path_factory.mktemp(name),
                                   text_encoder="tiny-t5-stand-in", vae_checkpoint=None)
            cache[name] = cfg, ours, CogVideoXTransformer3DModel.from_pretrained(out / "transformer").eval()
        return cache[name]

    return get


# (variant, T, H, W): images (T = 1) and videos, the tiny base grid (8x8 latents) and off-base aspect
# ratios, which exercise diffusers' RoPE crop-and-fit of 1.0 grids. 1.5 patches pairs of latent frames,
# and diffusers' 1.5 RoPE ("slice" grid) covers grids up to the base size only.
CASES = [(v, *s) for v in ("sincos", "rope") for s in [(1, 8, 8), (3, 8, 8), (4, 8, 12), (1, 12, 8)]] + [
    ("rope-1.5", 2, 8, 8), ("rope-1.5", 4, 8, 8), ("rope-1.5", 2, 4, 8)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}x{c[2]}x{c[3]}")
def test_exported_weights_give_diffusers_the_same_output(exported, case):
    name, frames, h, w = case
    cfg, ours, ref = exported(name)
    latents, text, t = _inputs(cfg, frames, h, w)
    rotary = None
    if cfg.pos_embed == "rope":
        # Exactly as CogVideoXPipeline builds it (pixel sizes in, latent frames in).
        pipe = types.SimpleNamespace(transformer=ref, vae_scale_factor_spatial=8)
        rotary = CogVideoXPipeline._prepare_rotary_positional_embeddings(
            pipe, h * 8, w * 8, frames, torch.device("cpu"))
    with torch.no_grad():
        got = ours(latents, text, t)
        expected = ref(latents, text, t, image_rotary_emb=rotary, return_dict=False)[0]
    assert got.shape == latents.shape == expected.shape
    assert (got - expected).abs().max().item() <= PARITY_ATOL
    assert expected.abs().mean() > 0.1, "a trivially small output would make the comparison meaningless"


@pytest.mark.parametrize("preset", sorted(DIT_PRESETS))
def test_preset_state_dict_keys_and_shapes_equal_diffusers(preset):
    cfg = DIT_PRESETS[preset]
    kwargs = {k: v for k, v in transformer_config(cfg).items() if not k.startswith("_")}
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in DiT(cfg).state_dict().items()}
        ref = {k: tuple(v.shape) for k, v in CogVideoXTransformer3DModel(**kwargs).state_dict().items()}
    assert ours == ref


def test_presets_have_the_published_parameter_counts():
    # anchors/dit.md section 1.4: instantiated from the released configs.
    assert param_counts(DIT_PRESETS["2b"])["total"] == 1_693_783_872
    assert param_counts(DIT_PRESETS["5b"])["total"] == 5_570_283_072
    assert DIT_PRESETS["2b"].pos_embed == "sincos" and DIT_PRESETS["5b"].pos_embed == "rope"
    assert (DIT_PRESETS["5b"].num_layers, DIT_PRESETS["5b"].num_heads, DIT_PRESETS["5b"].head_dim) == (42, 48, 64)


def test_flops_per_token_counts_per_token_weights_and_attention():
    cfg = DIT_PRESETS["2b"]
    counts = param_counts(cfg)
    # About 357M of the 2B's parameters are per-sample (adaLN, timestep MLP), anchors section 7.
    assert 350e6 < counts["per_sample"] < 365e6
    s = 226 + 13 * 30 * 45  # 49 frames at 480x720
    assert flops_per_token(cfg, s) == pytest.approx(6 * counts["per_token"] + 12 * 30 * 1920 * s)
    assert flops_per_token(cfg, s) == pytest.approx(20.2e9, rel=0.02)


def test_rope_positions_are_frame_row_column():
    cfg = dit_config("tiny", pos_embed="rope")  # base latent 8x8 -> 4x4 grid
    t, r, c = rope_positions(cfg, 3, 4, 4, torch.device("cpu"))
    assert t.tolist() == [0, 1, 2] and r.tolist() == [0, 1, 2, 3] and c.tolist() == [0, 1, 2, 3]
    # Off the base grid, 1.0 maps rows/columns onto the base grid's coordinates (equal spacing).
    _, r, c = rope_positions(cfg, 1, 2, 4, torch.device("cpu"))
    assert torch.allclose(r.diff(), r.diff()[:1]) and torch.allclose(c.diff(), c.diff()[:1])
    # 1.5 keeps integer positions at any size.
    _, r, c = rope_positions(dataclasses.replace(cfg, patch_size_t=2), 1, 6, 5, torch.device("cpu"))
    assert r.tolist() == list(range(6)) and c.tolist() == list(range(5))

    # The table: token (f, i, j) is frame-major; its time channels rotate by f, row channels by i,
    # column channels by j (head_dim 16 -> t 4, h 6, w 6 channels; pair frequencies theta^(-2k/d)).
    frames, rows, cols = 2, 4, 4
    cos, sin = rope_table(cfg, frames, rows, cols, torch.device("cpu"))
    assert cos.shape == sin.shape == (frames * rows * cols, cfg.head_dim)
    for f in range(frames):
        for i in range(rows):
            for j in range(cols):
                tok = (f * rows + i) * cols + j
                for pos, lo, d in ((f, 0, 4), (i, 4, 6), (j, 10, 6)):
                    freqs = 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d)
                    angle = (pos * freqs).repeat_interleave(2)
                    torch.testing.assert_close(cos[tok, lo:lo + d], angle.cos())
                    torch.testing.assert_close(sin[tok, lo:lo + d], angle.sin())


@pytest.mark.parametrize("pos_embed", ["sincos", "rope"])
def test_text_conditions_the_output(pos_embed):
    cfg = dit_config("tiny", pos_embed=pos_embed)
    model = _randomised(cfg)
    latents, text, t = _inputs(cfg, 2, 8, 8)
    other = text.clone()
    other[:, 2] += 1.0  # one token changed
    with torch.no_grad():
        a, b = model(latents, text, t), model(latents, other, t)
    assert (a - b).abs().max() > 1e-3
    # Each sample sees only its own caption.
    other = text.clone()
    other[1] += 1.0
    with torch.no_grad():
        c = model(latents, other, t)
    torch.testing.assert_close(c[0], a[0])
    assert (c[1] - a[1]).abs().max() > 1e-3


def test_sat_init_closes_every_gate():
    """From scratch every block is the identity (gates 0): the text cannot matter yet, and the output
    equals that of the same model without blocks."""
    cfg = dit_config("tiny")
    torch.manual_seed(0)
    model = DiT(cfg).eval()
    for blk in model.transformer_blocks:
        assert not blk.norm1.linear.weight.any() and not blk.norm2.linear.weight.any()
    assert not model.norm_out.linear.weight.any()
    bound = math.sqrt(6 / (cfg.dim + cfg.in_channels * 4))  # xavier-uniform on the flattened patch weight
    w = model.patch_embed.proj.weight
    assert w.abs().max() <= bound and w.std() > bound / 4
    latents, text, t = _inputs(cfg, 2, 8, 8)
    no_blocks = copy.deepcopy(model)
    no_blocks.transformer_blocks = torch.nn.ModuleList()
    with torch.no_grad():
        y = model(latents, text, t)
        torch.testing.assert_close(y, model(latents, torch.randn_like(text), t))
        torch.testing.assert_close(y, no_blocks(latents, text, t))


def test_expert_norms_give_text_and_vision_their_own_gradients():
    cfg = dit_config("tiny")
    # Random weights: from SAT's init the text stream cannot reach the loss yet (all gates closed),
    # so its modulation gets no gradient until the first update opens them.
    model = _randomised(cfg).train()
    latents, text, t = _inputs(cfg, 2, 8, 8)
    model(latents, text, t).square().mean().backward()
    d = cfg.dim
    # Rows of each modulation Linear: [shift, scale, gate | text shift, text scale, text gate]. The last
    # block's text outputs are discarded (only vision tokens are unpatchified), so of its text rows only
    # norm1's shift and scale, which shape the keys and values vision attends to, can reach the loss.
    last = len(model.transformer_blocks) - 1
    for i, blk in enumerate(model.transformer_blocks):
        live = ((blk.norm1, 2 * d if i == last else 3 * d), (blk.norm2, 0 if i == last else 3 * d))
        for norm, live_text_rows in live:
            g = norm.linear.weight.grad
            vision, txt = g[: 3 * d], g[3 * d:]
            assert vision.abs().sum(dim=1).gt(0).all()
            assert txt[:live_text_rows].abs().sum(dim=1).gt(0).all()
            assert not txt[live_text_rows:].any(), "dead text rows must get exactly no gradient"
            if live_text_rows:
                assert not torch.allclose(vision[:live_text_rows], txt[:live_text_rows], rtol=1e-3, atol=0)


def test_checkpointing_gives_the_same_output_and_gradients():
    cfg = dit_config("tiny")
    plain, ckpt = _randomised(cfg).train(), _randomised(dataclasses.replace(cfg, checkpointing=True)).train()
    latents, text, t = _inputs(cfg, 1, 8, 8)
    ys = []
    for model in (plain, ckpt):
        y = model(latents, text, t)
        y.square().mean().backward()
        ys.append(y.detach())
    torch.testing.assert_close(ys[0], ys[1])
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_bad_inputs_are_rejected_with_the_expected_shape():
    cfg = dit_config("tiny")
    model = DiT(cfg)
    latents, text, t = _inputs(cfg, 1, 8, 8)
    with pytest.raises(ValueError, match="latents"):
        model(latents[:, :, :, :7], text, t)
    with pytest.raises(ValueError, match="text"):
        model(latents, text[..., :5], t)
    with pytest.raises(ValueError, match="timesteps"):
        model(latents, text, t[:1])
    with pytest.raises(ValueError, match="latents"):
        DiT(dataclasses.replace(cfg, patch_size_t=2))(latents, text, t)  # one frame, temporal patches of 2
    with pytest.raises(ValueError, match="pos_embed"):
        dit_config("tiny", pos_embed="learned")
    with pytest.raises(KeyError, match="preset"):
        dit_config("7b")


# ---------------------------------------------------------------------------------------------
# Issue 10: GenTron's motion-free switch and CogVideo's frame-rate conditioning
# ---------------------------------------------------------------------------------------------

from trainer.models.dit import MotionFree, motion_free_attention  # noqa: E402


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_options_off_give_the_plain_dit_bit_for_bit(name):
    cfg = VARIANTS[name]
    model = _randomised(cfg)
    frames = 4 if cfg.patch_size_t else 3
    latents, text, t = _inputs(cfg, frames, 8, 8)
    with torch.no_grad():
        plain = model(latents, text, t)
        off = model(latents, text, t, motion_free=torch.zeros(2, dtype=torch.bool), fps=None, guidance=None)
    assert torch.equal(plain, off)
    assert not cfg.fps_conditioning and not any(k.startswith("ofs_") for k in model.state_dict())
    assert not cfg.guidance_conditioning and not any(k.startswith("guidance_") for k in model.state_dict())


def _dense_block_diagonal_reference(q, k, v, n_text, frames):
    """The motion-free attention written as the dense boolean mask it replaces: text rows see text,
    a frame's rows see the text and that frame."""
    s = q.shape[2]
    n = (s - n_text) // frames
    owner = torch.cat([torch.full((n_text,), -1), torch.arange(frames).repeat_interleave(n)])  # (S,)
    allowed = (owner[None, :] == -1) & (owner[:, None] == -1)  # text -> text
    allowed |= (owner[:, None] >= 0) & ((owner[None, :] == -1) | (owner[None, :] == owner[:, None]))
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed)


def test_frame_local_attention_equals_the_dense_block_diagonal_mask():
    g = torch.Generator().manual_seed(0)
    n_text, frames, n = 5, 3, 6
    q, k, v = (torch.randn(3, 2, n_text + frames * n, 8, generator=g) for _ in range(3))
    expected = _dense_block_diagonal_reference(q, k, v, n_text, frames)
    every = MotionFree(torch.ones(3, dtype=torch.bool), n_text, frames, all=True)
    torch.testing.assert_close(motion_free_attention(q, k, v, every), expected, rtol=1e-5, atol=1e-6)
    mixed = MotionFree(torch.tensor([True, False, True]), n_text, frames, all=False)
    got = motion_free_attention(q, k, v, mixed)
    torch.testing.assert_close(got[[0, 2]], expected[[0, 2]], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], torch.nn.functional.scaled_dot_product_attention(q, k, v)[1])


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_motion_free_frames_do_not_see_each_other(name):
    cfg = VARIANTS[name]
    model = _randomised(cfg)
    pt = cfg.patch_size_t or 1
    frames = 3 * pt
    latents, text, t = _inputs(cfg, frames, 8, 8)
    changed = latents.clone()
    changed[:, pt:2 * pt] += 1.0  # latent frame(s) of token frame 1
    others = [i for i in range(frames) if not pt <= i < 2 * pt]
    on = torch.ones(2, dtype=torch.bool)
    with torch.no_grad():
        a, b = model(latents, text, t, motion_free=on), model(changed, text, t, motion_free=on)
        a_off, b_off = model(latents, text, t), model(changed, text, t)
    torch.testing.assert_close(b[:, others], a[:, others], rtol=0, atol=1e-6)
    assert (b[:, pt:2 * pt] - a[:, pt:2 * pt]).abs().max() > 1e-2
    assert (b_off[:, others] - a_off[:, others]).abs().max() > 1e-2, "without the switch frames must interact"
    # the text still conditions a motion-free sample
    with torch.no_grad():
        c = model(latents, text + 1.0, t, motion_free=on)
    assert (c - a).abs().max() > 1e-2


def test_a_mixed_batch_gives_each_sample_its_own_mode():
    cfg = VARIANTS["rope"]
    model = _randomised(cfg)
    latents, text, t = _inputs(cfg, 3, 8, 8)
    with torch.no_grad():
        mixed = model(latents, text, t, motion_free=torch.tensor([True, False]))
        free = model(latents, text, t, motion_free=torch.ones(2, dtype=torch.bool))
        plain = model(latents, text, t)
    torch.testing.assert_close(mixed[0], free[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mixed[1], plain[1], rtol=1e-5, atol=1e-6)
    assert (free[1] - plain[1]).abs().max() > 1e-2


def test_motion_free_trains_through_checkpointed_blocks():
    cfg = dit_config("tiny", checkpointing=True)
    model = _randomised(cfg).train()
    latents, text, t = _inputs(cfg, 1, 8, 8)
    static = latents.expand(-1, 3, -1, -1, -1).contiguous()  # GenTron's image repeated into a pseudo-video
    model(static, text, t, motion_free=torch.ones(2, dtype=torch.bool)).square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.transformer_blocks[0].attn1.to_q.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="motion_free"):
        model(static, text, t, motion_free=torch.ones(2))


def test_fps_conditioning_adds_only_the_ofs_keys_and_starts_as_the_plain_dit():
    cfg = dit_config("tiny")
    on_cfg = dataclasses.replace(cfg, fps_conditioning=True)
    plain, on = DiT(cfg), DiT(on_cfg)
    extra = set(on.state_dict()) - set(plain.state_dict())
    assert set(plain.state_dict()) <= set(on.state_dict())
    assert extra == {f"ofs_embedding.linear_{i}.{p}" for i in (1, 2) for p in ("weight", "bias")}
    assert param_counts(on_cfg)["per_sample"] - param_counts(cfg)["per_sample"] == sum(
        on.state_dict()[k].numel() for k in extra)
    model = _randomised(cfg)
    with_fps = DiT(on_cfg).eval()
    with_fps.load_state_dict(model.state_dict(), strict=False)  # ofs_embedding keeps its zero last layer
    latents, text, t = _inputs(cfg, 2, 8, 8)
    with torch.no_grad():
        y8, y24 = with_fps(latents, text, t, fps=torch.tensor([8.0, 8.0])), with_fps(
            latents, text, t, fps=torch.tensor([24.0, 24.0]))
        torch.testing.assert_close(y8, model(latents, text, t))
        assert torch.equal(y8, y24), "zero-initialised: the frame rate cannot matter yet"
        with_fps.ofs_embedding.linear_2.weight.normal_(0.0, 0.2)
        y8, y24 = with_fps(latents, text, t, fps=torch.tensor([8.0, 8.0])), with_fps(
            latents, text, t, fps=torch.tensor([24.0, 24.0]))
    assert (y8 - y24).abs().max() > 1e-2
    with pytest.raises(ValueError, match="fps"):
        with_fps(latents, text, t)
    with pytest.raises(ValueError, match="fps"):
        model(latents, text, t, fps=torch.tensor([8.0, 8.0]))


def test_fps_conditioned_export_loads_in_diffusers_with_fps_as_ofs(tmp_path):
    cfg = dit_config("tiny", fps_conditioning=True)
    ours = _randomised(cfg)
    out = export_diffusers(cfg, ours.state_dict(), tmp_path, text_encoder="tiny-t5-stand-in", vae_checkpoint=None)
    ref = CogVideoXTransformer3DModel.from_pretrained(out / "transformer").eval()
    assert ref.config.ofs_embed_dim == cfg.time_embed_dim
    latents, text, t = _inputs(cfg, 2, 8, 8)
    pipe = types.SimpleNamespace(transformer=ref, vae_scale_factor_spatial=8)
    rotary = CogVideoXPipeline._prepare_rotary_positional_embeddings(pipe, 64, 64, 2, torch.device("cpu"))
    fps = torch.tensor([8.0, 30.0])
    with torch.no_grad():
        got = ours(latents, text, t, fps=fps)
        expected = ref(latents, text, t, ofs=fps, image_rotary_emb=rotary, return_dict=False)[0]
        other = ours(latents, text, t, fps=fps.flip(0))
    assert (got - expected).abs().max().item() <= PARITY_ATOL
    assert (got - other).abs().max() > 1e-2
