"""Sampling-time guidance: weight schedules (constant, dynamic cosine, oscillating), dynamic thresholding
of x0 and GenTron's three-pass motion-free guidance, driven through trainer.diffusion.guided_sample."""
from __future__ import annotations

import math

import pytest
import torch

from trainer import diffusion as D

AC = D.alphas_cumprod(D.ScheduleConfig(snr_shift_scale=1.0))


class ToyDenoiser:
    """A fixed v-predictor that depends on the latents, the text, the timestep and the motion-free flag,
    and records the conditioning it was called with."""

    def __init__(self, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.w_text, self.w_free = torch.randn(1, generator=g).item(), torch.randn(1, generator=g).item()
        self.calls: list[dict] = []

    def __call__(self, x, text, t, **cond):
        self.calls.append({k: v.clone() for k, v in cond.items()} | {"batch": x.shape[0]})
        v = 0.3 * x + self.w_text * text.mean(dim=(1, 2)).reshape(-1, 1, 1, 1, 1) + t.reshape(-1, 1, 1, 1, 1) / 3000
        if "motion_free" in cond:
            # a motion-free pass sees no other frame: replace the frame mean by the frame itself
            free = cond["motion_free"].reshape(-1, 1, 1, 1, 1).float()
            v = v + free * self.w_free * (x - x.mean(dim=1, keepdim=True))
        if "fps" in cond:
            v = v + cond["fps"].reshape(-1, 1, 1, 1, 1) / 100
        return v


def _inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, 2, 4, 4, generator=g), torch.randn(2, 5, 8, generator=g), torch.zeros(1, 5, 8)


def _manual_cfg_loop(model, noise, text, null, weights, num_steps, threshold=None):
    x, both = noise, torch.cat([null.expand_as(text), text])
    for t, w in zip(D.ddim_timesteps(num_steps).tolist(), weights, strict=True):
        v_u, v_c = model(torch.cat([x, x]), both, torch.full((4,), t)).chunk(2)
        x = D.ddim_step(x, v_u + w * (v_c - v_u), t, t - 1000 // num_steps, AC, threshold)
    return x


def test_oscillating_guidance_alternates_after_the_initial_high_steps_and_uses_those_weights():
    cfg = D.GuidanceConfig(schedule="oscillating", high=15.0, low=1.0, high_steps=3)
    model = ToyDenoiser()
    noise, text, null = _inputs()
    out = D.guided_sample(model, noise, text, ac=AC, num_steps=10, guidance=cfg, null_text=null)
    assert out.weights == [15.0, 15.0, 15.0, 1.0, 15.0, 1.0, 15.0, 1.0, 15.0, 1.0]
    # The recorded weights are the ones applied: the same loop written out with them gives the same x0,
    # and a constant weight of 15 does not.
    torch.testing.assert_close(out.x0, _manual_cfg_loop(model, noise, text, null, out.weights, 10))
    constant = D.guided_sample(model, noise, text, ac=AC, num_steps=10, guidance=D.GuidanceConfig(scale=15.0),
                               null_text=null)
    assert constant.weights == [15.0] * 10
    assert not torch.allclose(constant.x0, out.x0)


def test_oscillating_defaults_are_imagen_videos_15_and_1():
    weights = D.guidance_weights(D.GuidanceConfig(schedule="oscillating"), D.ddim_timesteps(6))
    assert weights == [15.0, 1.0, 15.0, 1.0, 15.0, 1.0]
    assert D.guidance_weights(D.GuidanceConfig(schedule="oscillating", high_steps=0), D.ddim_timesteps(3)) == [
        1.0, 15.0, 1.0]


def test_dynamic_cosine_ramps_from_one_at_pure_noise_to_one_plus_w():
    steps = D.ddim_timesteps(50)
    w = D.guidance_weights(D.GuidanceConfig(schedule="dynamic_cosine", scale=6.0), steps)
    assert len(w) == 50
    assert all(b >= a for a, b in zip(w, w[1:])), "the weight must rise as t falls"
    assert 1.0 <= min(w) and max(w) <= 7.0
    assert w[0] == pytest.approx(1.0, abs=1e-9)  # t = 999: ((1000 - 999) / 1000)^5 ~ 1e-15
    # t = 499 (step 25): 1 + 6 (1 - cos(pi 0.501^5)) / 2
    assert steps[25].item() == 499
    assert w[25] == pytest.approx(1 + 6 * (1 - math.cos(math.pi * 0.501**5)) / 2, rel=1e-12)
    assert w[-1] == pytest.approx(1 + 6 * (1 - math.cos(math.pi * (981 / 1000) ** 5)) / 2, rel=1e-12)
    assert w[-1] > 6.8


def test_dynamic_threshold_clips_each_sample_at_its_own_percentile():
    # sample 0: |x| = 0.01 .. 4.00; its 0.9 quantile is 3.601, so it is clipped there and divided by it.
    # sample 1: every |x| <= 0.5, under the floor of 1: left as it is.
    a = torch.linspace(0.01, 4.0, 400) * torch.where(torch.arange(400) % 2 == 0, 1.0, -1.0)
    b = torch.linspace(-0.5, 0.5, 400)
    x0 = torch.stack([a, b]).reshape(2, 4, 1, 10, 10)
    out = D.dynamic_threshold(x0, 0.9, floor=1.0)
    s0 = torch.quantile(a.abs(), 0.9).item()
    assert s0 == pytest.approx(3.601, abs=1e-3)
    torch.testing.assert_close(out[0].flatten(), a.clamp(-s0, s0) / s0)
    assert out[0].abs().max().item() == pytest.approx(1.0)
    assert (out[0].abs() == 1.0).sum().item() >= 40  # the top 10% all sit at the bound
    torch.testing.assert_close(out[1], x0[1])
    # range [-2, 2]: sample 0 is still clipped at 3.601 and scaled into [-2, 2], sample 1 untouched
    out2 = D.dynamic_threshold(x0, 0.9, floor=2.0)
    torch.testing.assert_close(out2[0], 2.0 * out[0])
    torch.testing.assert_close(out2[1], x0[1])


def test_dynamic_thresholding_in_the_sampler_bounds_the_final_latents():
    model = ToyDenoiser()
    noise, text, null = _inputs()
    cfg = D.GuidanceConfig(scale=15.0, dynamic_threshold=0.95, threshold_floor=1.0)
    out = D.guided_sample(model, noise, text, ac=AC, num_steps=8, guidance=cfg, null_text=null)
    plain = D.guided_sample(model, noise, text, ac=AC, num_steps=8, guidance=D.GuidanceConfig(scale=15.0),
                            null_text=null)
    # The last step lands on alpha_bar = 1, so the result is the thresholded x0 itself: inside [-1, 1].
    assert plain.x0.abs().max() > 1.5
    assert out.x0.abs().max() <= 1.0 + 1e-6
    torch.testing.assert_close(out.x0, _manual_cfg_loop(model, noise, text, null, [15.0] * 8, 8, (0.95, 1.0)))


def test_motion_free_guidance_with_lambda_m_one_is_plain_cfg():
    model = ToyDenoiser()
    noise, text, null = _inputs()
    cfg = D.guided_sample(model, noise, text, ac=AC, num_steps=6, guidance=D.GuidanceConfig(scale=7.5),
                          null_text=null).x0
    model.calls.clear()
    mfg1 = D.guided_sample(model, noise, text, ac=AC, num_steps=6,
                           guidance=D.GuidanceConfig(scale=7.5, motion_scale=1.0), null_text=null).x0
    torch.testing.assert_close(mfg1, cfg, rtol=1e-5, atol=1e-5)
    # three passes per step; only the first third (null text) is motion-free
    assert len(model.calls) == 6 and all(c["batch"] == 6 for c in model.calls)
    assert model.calls[0]["motion_free"].tolist() == [True, True, False, False, False, False]
    mfg13 = D.guided_sample(model, noise, text, ac=AC, num_steps=6,
                            guidance=D.GuidanceConfig(scale=7.5, motion_scale=1.3), null_text=null).x0
    assert (mfg13 - cfg).abs().max() > 1e-3


def test_motion_free_combine_is_gentrons_formula():
    g = torch.Generator().manual_seed(0)
    free, null, txt = (torch.randn(3, 4, generator=g) for _ in range(3))
    got = D.motion_free_combine(free, null, txt, 7.5, 1.2)
    torch.testing.assert_close(got, free + 7.5 * (txt - null) + 1.2 * (null - free))
    torch.testing.assert_close(D.motion_free_combine(free, null, txt, 7.5, 1.0), D.cfg_combine(null, txt, 7.5))


def test_per_sample_conditioning_is_repeated_for_every_pass():
    model = ToyDenoiser()
    noise, text, null = _inputs()
    fps = torch.tensor([8.0, 24.0])
    D.guided_sample(model, noise, text, ac=AC, num_steps=2, null_text=null, conditioning={"fps": fps})
    assert model.calls[0]["fps"].tolist() == [8.0, 24.0, 8.0, 24.0]


def test_bad_guidance_settings_are_refused():
    with pytest.raises(ValueError, match="schedule"):
        D.GuidanceConfig(schedule="cosine")
    with pytest.raises(ValueError, match="dynamic_threshold"):
        D.GuidanceConfig(dynamic_threshold=1.5)


def test_motion_free_draw_is_seeded_per_step_and_rank_with_probability_p():
    a = D.motion_free_draw(step=5, seed=0, rank=1, batch=4000, p=0.3)
    assert a.dtype == torch.bool and a.shape == (4000,)
    assert torch.equal(a, D.motion_free_draw(step=5, seed=0, rank=1, batch=4000, p=0.3))
    assert not torch.equal(a, D.motion_free_draw(step=5, seed=0, rank=0, batch=4000, p=0.3))
    assert not torch.equal(a, D.motion_free_draw(step=6, seed=0, rank=1, batch=4000, p=0.3))
    assert abs(a.double().mean().item() - 0.3) < 0.03
    assert D.motion_free_draw(step=1, seed=0, rank=0, batch=8, p=1.0).all()
    assert not D.motion_free_draw(step=1, seed=0, rank=0, batch=8, p=0.0).any()
