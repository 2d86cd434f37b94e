"""CogVideoX diffusion maths as plain functions (DESIGN.md section 5, anchors/dit.md sections 1.5 and 2).

Schedule: scaled-linear betas 0.00085 -> 0.012 over 1000 steps, the SNR shift
``a / (s + (1 - s) a)`` applied to alphas_cumprod (s = 3.0 for the 2B, 1.0 for the 5B), then
rescaled to zero terminal SNR (the last alpha_bar is exactly 0), in that order, as diffusers'
``CogVideoXDDIMScheduler`` does. The model predicts v; the loss is taken in x0 space with weight
1/(1 - alpha_bar), which is the plain MSE in v.

Every tensor ``t`` is a (B,) int64 tensor of timesteps in [0, num_train_timesteps); ``alphas_cumprod``
is the (num_train_timesteps,) float64 table from :func:`alphas_cumprod`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch


@dataclass(frozen=True, kw_only=True, slots=True)
class ScheduleConfig:
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    snr_shift_scale: float = 3.0
    """SNR shift s: alpha_bar -> alpha_bar / (s + (1 - s) alpha_bar); 3.0 for CogVideoX-2B, 1.0 (none) for 5B."""

    def __post_init__(self) -> None:
        if self.num_train_timesteps < 2:
            raise ValueError(f"ScheduleConfig.num_train_timesteps: expected >= 2, got {self.num_train_timesteps}")
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ValueError(
                f"ScheduleConfig: expected 0 < beta_start < beta_end < 1, got {self.beta_start}, {self.beta_end}"
            )
        if self.snr_shift_scale <= 0:
            raise ValueError(f"ScheduleConfig.snr_shift_scale: expected > 0, got {self.snr_shift_scale}")


# The released CogVideoX scheduler configs differ only in the SNR shift (anchors/dit.md section 1.5).
# The tiny preset trains on small latents, where the 2B's high-resolution shift has no reason to apply.
SCHEDULE_PRESETS: dict[str, ScheduleConfig] = {
    "tiny": ScheduleConfig(snr_shift_scale=1.0),
    "2b": ScheduleConfig(snr_shift_scale=3.0),
    "5b": ScheduleConfig(snr_shift_scale=1.0),
}


# ---------------------------------------------------------------------------------------------
# The noise schedule
# ---------------------------------------------------------------------------------------------


def alphas_cumprod(cfg: ScheduleConfig = ScheduleConfig()) -> torch.Tensor:
    """alpha_bar_t for t = 0..T-1, float64, (T,); alpha_bar[-1] == 0 exactly."""
    # float64 throughout: the zero-SNR rescale subtracts two close numbers near t = T-1.
    betas = torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, cfg.num_train_timesteps, dtype=torch.float64) ** 2
    a = torch.cumprod(1.0 - betas, dim=0)
    s = cfg.snr_shift_scale
    a = a / (s + (1.0 - s) * a)
    # Zero terminal SNR (Lin et al. 2023, Algorithm 1) on sqrt(alpha_bar): keep the first value, move the last to 0.
    r = a.sqrt()
    r0, r_last = r[0].clone(), r[-1].clone()
    r = (r - r_last) * (r0 / (r0 - r_last))
    return r**2


def _per_sample(coef: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) coefficients -> broadcastable against ``like`` (B, ...), in like's dtype."""
    return coef.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def _alpha_sigma(t: torch.Tensor, ac: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a = ac.to(t.device)[t]  # (B,) float64
    return _per_sample(a.sqrt(), like), _per_sample((1.0 - a).sqrt(), like)


def q_sample(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, ac: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(a) x0 + sqrt(1 - a) noise."""
    alpha, sigma = _alpha_sigma(t, ac, x0)
    return alpha * x0 + sigma * noise


def v_target(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, ac: torch.Tensor) -> torch.Tensor:
    """v = sqrt(a) noise - sqrt(1 - a) x0 (diffusers' ``get_velocity``)."""
    alpha, sigma = _alpha_sigma(t, ac, x0)
    return alpha * noise - sigma * x0


def x0_from_v(x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor, ac: torch.Tensor) -> torch.Tensor:
    """x0 = sqrt(a) x_t - sqrt(1 - a) v."""
    alpha, sigma = _alpha_sigma(t, ac, x_t)
    return alpha * x_t - sigma * v


def diffusion_loss(
    v_pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, ac: torch.Tensor
) -> torch.Tensor:
    """Per-sample loss (B,): mean over the rest of 1/(1 - a) * (x0_pred - x0)^2, CogVideoX's x0-space loss.

    Since x0_pred - x0 = -sqrt(1 - a) (v_pred - v), this equals the v-MSE; it is written in x0 space so
    the weighting is the one the paper states. 1 - a >= 1 - a[0] > 0, so the weight is finite everywhere.
    """
    x_t = q_sample(x0, noise, t, ac)
    x0_pred = x0_from_v(x_t, v_pred, t, ac)
    weight = _per_sample(1.0 / (1.0 - ac.to(t.device)[t]), x0)
    return (weight * (x0_pred - x0) ** 2).flatten(1).mean(dim=1)


def timestep_bins(t: torch.Tensor, num_bins: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """(B,) bin index in [0, num_bins) of each timestep, for logging the loss by timestep slice."""
    return t * num_bins // num_train_timesteps


# ---------------------------------------------------------------------------------------------
# Explicit uniform (stratified) timestep sampling
# ---------------------------------------------------------------------------------------------


def _generator(seed: int, step: int) -> torch.Generator:
    # SeedSequence mixes (seed, step) into independent streams; every rank builds the same one.
    state = np.random.SeedSequence([seed, step]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def global_stratified_timesteps(
    *, step: int, seed: int, global_batch: int, num_train_timesteps: int = 1000
) -> torch.Tensor:
    """Timesteps (N,) of one global batch of N samples: sample i draws uniformly from slice i of [0, T).

    Slice i is the integer range [floor(i T / N), floor((i + 1) T / N)). For N <= T the slices partition
    [0, T), so each global batch covers the range evenly whatever the world size (CogVideoX's per-rank
    intervals, taken per sample). For N > T some slices hold one timestep shared with a neighbour.
    """
    if global_batch < 1:
        raise ValueError(f"global_stratified_timesteps: expected global_batch >= 1, got {global_batch}")
    n, big_t = global_batch, num_train_timesteps
    i = torch.arange(n, dtype=torch.int64)
    lo = i * big_t // n
    hi = torch.maximum((i + 1) * big_t // n, lo + 1)
    u = torch.rand(n, generator=_generator(seed, step), dtype=torch.float64)
    t = lo + (u * (hi - lo)).long()
    return torch.minimum(t, hi - 1)


def stratified_timesteps(
    *, step: int, seed: int, rank: int, world_size: int, local_batch: int, num_train_timesteps: int = 1000
) -> torch.Tensor:
    """This rank's timesteps (local_batch,): global indices rank*local_batch .. (rank+1)*local_batch - 1.

    Every rank draws the whole global batch from the same seeded generator and keeps its part, so the
    ranks agree without communicating and one process with world_size=1 gets the same coverage.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"stratified_timesteps: expected 0 <= rank < world_size={world_size}, got rank={rank}")
    t = global_stratified_timesteps(
        step=step, seed=seed, global_batch=world_size * local_batch, num_train_timesteps=num_train_timesteps
    )
    return t[rank * local_batch : (rank + 1) * local_batch]


# ---------------------------------------------------------------------------------------------
# DDIM sampling (eta = 0, v-prediction), as diffusers' CogVideoXDDIMScheduler steps it
# ---------------------------------------------------------------------------------------------


def ddim_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """"trailing" spacing (num_steps,), descending and starting at T-1, e.g. 999, 979, ..., 19 for 50 steps."""
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"ddim_timesteps: expected 1 <= num_steps <= {num_train_timesteps}, got {num_steps}")
    ratio = num_train_timesteps / num_steps
    return torch.from_numpy(np.round(np.arange(num_train_timesteps, 0, -ratio)).astype(np.int64) - 1)


def ddim_step(x_t: torch.Tensor, v_pred: torch.Tensor, t: int, t_prev: int, ac: torch.Tensor) -> torch.Tensor:
    """One deterministic DDIM step x_t -> x_{t_prev}; t_prev < 0 means the end (alpha_bar = 1)."""
    a_t = float(ac[t])
    a_prev = float(ac[t_prev]) if t_prev >= 0 else 1.0
    x0 = a_t**0.5 * x_t - (1.0 - a_t) ** 0.5 * v_pred
    # x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps, with eps = (x_t - sqrt(a_t) x0) / sqrt(1 - a_t).
    c_x = ((1.0 - a_prev) / (1.0 - a_t)) ** 0.5
    c_x0 = a_prev**0.5 - a_t**0.5 * c_x
    return c_x * x_t + c_x0 * x0


Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""model(latents (B, T, C, H, W), text (B, L, E), timesteps (B,)) -> v prediction like latents."""


@torch.no_grad()
def ddim_sample(
    model: Denoiser,
    noise: torch.Tensor,
    text: torch.Tensor,
    *,
    ac: torch.Tensor,
    num_steps: int = 50,
    guidance_scale: float = 6.0,
    null_text: torch.Tensor | None = None,
) -> torch.Tensor:
    """Denoise ``noise`` (B, T, C, H, W) into x0 with DDIM and classifier-free guidance.

    As diffusers' CogVideoX pipeline: the unconditional and conditional passes run as one batch
    [null; text], v = v_uncond + w (v_text - v_uncond), and the step after t is t - T // num_steps.
    ``null_text`` (B or 1, L, E) is the empty-prompt embedding; None or guidance_scale == 1 skips CFG.
    """
    big_t = ac.shape[0]
    use_cfg = null_text is not None and guidance_scale != 1.0
    if use_cfg:
        null_text = null_text.expand_as(text)
        text = torch.cat([null_text, text])  # (2B, L, E)
    x = noise
    for t in ddim_timesteps(num_steps, big_t).tolist():
        x_in = torch.cat([x, x]) if use_cfg else x
        v = model(x_in, text, torch.full((x_in.shape[0],), t, dtype=torch.int64, device=x.device)).float()
        if use_cfg:
            v_uncond, v_text = v.chunk(2)
            v = v_uncond + guidance_scale * (v_text - v_uncond)
        # diffusers steps to t - T // N even where trailing spacing puts the next timestep elsewhere
        # (N not dividing T); kept so exported models sample the same here and in diffusers.
        x = ddim_step(x.float(), v, t, t - big_t // num_steps, ac).to(noise.dtype)
    return x


__all__ = [
    "SCHEDULE_PRESETS",
    "Denoiser",
    "ScheduleConfig",
    "alphas_cumprod",
    "ddim_sample",
    "ddim_step",
    "ddim_timesteps",
    "diffusion_loss",
    "global_stratified_timesteps",
    "q_sample",
    "stratified_timesteps",
    "timestep_bins",
    "v_target",
    "x0_from_v",
]
