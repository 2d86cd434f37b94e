"""The diffusion maths against diffusers' CogVideoXDDIMScheduler, and the stratified timestep sampler."""
from __future__ import annotations

import pytest
import torch

from trainer import diffusion as D

diffusers = pytest.importorskip("diffusers")


def _reference_scheduler(snr_shift_scale: float) -> "diffusers.CogVideoXDDIMScheduler":
    # The released CogVideoX-2b scheduler_config.json values (anchors/dit.md section 1.5).
    return diffusers.CogVideoXDDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=True, steps_offset=0, prediction_type="v_prediction",
        timestep_spacing="trailing", rescale_betas_zero_snr=True, snr_shift_scale=snr_shift_scale,
    )


@pytest.mark.parametrize("shift", [3.0, 1.0])
def test_schedule_matches_diffusers_and_ends_at_zero_snr(shift):
    ac = D.alphas_cumprod(D.ScheduleConfig(snr_shift_scale=shift))
    ref = _reference_scheduler(shift).alphas_cumprod.double()
    assert ac.shape == (1000,)
    assert ac[-1].item() == 0.0
    assert torch.all(ac[1:] < ac[:-1]), "alpha_bar must fall monotonically"
    assert torch.allclose(ac, ref, atol=1e-6, rtol=0)


def test_snr_shift_lowers_snr_everywhere_but_the_ends():
    plain, shifted = D.alphas_cumprod(D.ScheduleConfig(snr_shift_scale=1.0)), D.alphas_cumprod()
    assert torch.all(shifted[1:-1] < plain[1:-1])


def test_x0_weighted_loss_equals_v_mse():
    g = torch.Generator().manual_seed(0)
    ac = D.alphas_cumprod()
    x0, noise, v_pred = (torch.randn(6, 3, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    loss = D.diffusion_loss(v_pred, x0, noise, t, ac)
    v_mse = ((v_pred - D.v_target(x0, noise, t, ac)) ** 2).flatten(1).mean(1)
    assert loss.shape == (6,)
    torch.testing.assert_close(loss, v_mse, rtol=1e-10, atol=0)
    # In float32 the 1/(1 - a) weight (up to ~400 at t = 0) amplifies rounding, but stays close.
    loss32 = D.diffusion_loss(v_pred.float(), x0.float(), noise.float(), t, ac)
    torch.testing.assert_close(loss32.double(), v_mse, rtol=1e-3, atol=0)


def test_q_sample_and_v_match_diffusers():
    sched = _reference_scheduler(3.0)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(4, 2, 4, 6, 6, generator=g), torch.randn(4, 2, 4, 6, 6, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    ac = D.alphas_cumprod()
    torch.testing.assert_close(D.q_sample(x0, noise, t, ac), sched.add_noise(x0, noise, t), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(D.v_target(x0, noise, t, ac), sched.get_velocity(x0, noise, t), rtol=1e-6, atol=1e-6)
    x_t = D.q_sample(x0, noise, t, ac)
    torch.testing.assert_close(D.x0_from_v(x_t, D.v_target(x0, noise, t, ac), t, ac), x0, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("local_batch", [1, 4, 7])
def test_stratified_timesteps_cover_each_slice_once_per_global_batch(world_size, local_batch):
    n = world_size * local_batch
    lo = [i * 1000 // n for i in range(n)]
    hi = [(i + 1) * 1000 // n for i in range(n)]
    for step in range(5):
        ranks = [
            D.stratified_timesteps(step=step, seed=7, rank=r, world_size=world_size, local_batch=local_batch)
            for r in range(world_size)
        ]
        assert all(t.shape == (local_batch,) and t.dtype == torch.int64 for t in ranks)
        gathered = torch.cat(ranks).tolist()  # global index i = rank * local_batch + position
        assert all(lo[i] <= t < hi[i] for i, t in enumerate(gathered)), (gathered, lo, hi)
        # The slices partition [0, 1000): every slice is hit exactly once.
        slice_of = [next(i for i in range(n) if lo[i] <= t < hi[i]) for t in gathered]
        assert sorted(slice_of) == list(range(n))
        single = D.global_stratified_timesteps(step=step, seed=7, global_batch=n)
        assert single.tolist() == gathered, "ranks must agree with one process drawing the whole batch"


def test_stratified_timesteps_are_uniform_within_slices_and_vary_with_step_and_seed():
    draws = torch.stack([D.global_stratified_timesteps(step=s, seed=0, global_batch=4) for s in range(4000)])
    # Slice 0 is [0, 250): its draws are spread over the slice, not stuck at one value.
    counts = torch.bincount(draws[:, 0], minlength=250).float()
    assert counts.shape == (250,) and (counts > 0).float().mean() > 0.95
    assert abs(draws[:, 0].double().mean().item() - 124.5) < 5
    a = D.global_stratified_timesteps(step=3, seed=0, global_batch=8)
    assert not torch.equal(a, D.global_stratified_timesteps(step=4, seed=0, global_batch=8))
    assert not torch.equal(a, D.global_stratified_timesteps(step=3, seed=1, global_batch=8))


def test_trailing_timesteps_match_diffusers():
    for n in (50, 30, 7, 1):
        sched = _reference_scheduler(3.0)
        sched.set_timesteps(n)
        assert D.ddim_timesteps(n).tolist() == sched.timesteps.tolist()


@pytest.mark.parametrize("t_index", [0, 1, 25, 49])
def test_ddim_step_matches_diffusers(t_index):
    sched = _reference_scheduler(3.0)
    sched.set_timesteps(50)
    t = int(sched.timesteps[t_index])
    g = torch.Generator().manual_seed(t_index)
    x_t, v = torch.randn(2, 3, 4, 6, 6, generator=g), torch.randn(2, 3, 4, 6, 6, generator=g)
    expected = sched.step(v, t, x_t, eta=0.0, return_dict=False)[0]
    got = D.ddim_step(x_t, v, t, t - 1000 // 50, D.alphas_cumprod())
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_ddim_sample_with_cfg_matches_a_diffusers_loop():
    """The whole sampler, CFG included, against diffusers' scheduler driven the way its pipeline drives it."""
    g = torch.Generator().manual_seed(3)
    w_text = torch.randn(5, generator=g)

    def model(x, text, t):  # a fixed, text- and time-dependent linear "denoiser"
        return 0.5 * x + text.mean(dim=(1, 2)).reshape(-1, 1, 1, 1, 1) * w_text[0] + t.reshape(-1, 1, 1, 1, 1) / 2000

    noise = torch.randn(2, 2, 3, 4, 4, generator=g)
    text, null = torch.randn(2, 5, 8, generator=g), torch.zeros(1, 5, 8)
    got = D.ddim_sample(model, noise, text, ac=D.alphas_cumprod(), num_steps=10, guidance_scale=6.0, null_text=null)

    sched = _reference_scheduler(3.0)
    sched.set_timesteps(10)
    x, both = noise, torch.cat([null.expand_as(text), text])
    for t in sched.timesteps:
        v_u, v_c = model(torch.cat([x, x]), both, t.expand(4)).chunk(2)
        x = sched.step(v_u + 6.0 * (v_c - v_u), t, x, return_dict=False)[0]
    torch.testing.assert_close(got, x, rtol=1e-5, atol=1e-5)
    unguided = D.ddim_sample(model, noise, text, ac=D.alphas_cumprod(), num_steps=10, guidance_scale=1.0,
                             null_text=null)
    assert not torch.allclose(unguided, got)
