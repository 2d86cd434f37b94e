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

import math
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


def motion_free_draw(*, step: int, seed: int, rank: int, batch: int, p: float) -> torch.Tensor:
    """GenTron's per-sample motion-free switch for one step on one rank, (batch,) bool, each True with
    probability p; a pure function of (seed, step, rank), so a resumed run draws the same."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"motion_free_draw: expected 0 <= p <= 1, got {p}")
    # a stream of its own: SeedSequence over (seed, step, rank, tag), apart from the timesteps' (seed, step)
    state = np.random.SeedSequence([seed, step, rank, 0x4D46]).generate_state(2, dtype=np.uint32)
    g = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
    return torch.rand(batch, generator=g, dtype=torch.float64) < p


# ---------------------------------------------------------------------------------------------
# DDIM sampling (eta = 0, v-prediction), as diffusers' CogVideoXDDIMScheduler steps it
# ---------------------------------------------------------------------------------------------


def ddim_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """"trailing" spacing (num_steps,), descending and starting at T-1, e.g. 999, 979, ..., 19 for 50 steps."""
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"ddim_timesteps: expected 1 <= num_steps <= {num_train_timesteps}, got {num_steps}")
    ratio = num_train_timesteps / num_steps
    return torch.from_numpy(np.round(np.arange(num_train_timesteps, 0, -ratio)).astype(np.int64) - 1)


Denoiser = Callable[..., torch.Tensor]
"""model(latents (B, T, C, H, W), text (B, L, E), timesteps (B,), **conditioning) -> v prediction like latents.

``conditioning`` is what the DiT takes besides the three tensors (``motion_free`` (B,) bool, ``fps`` (B,));
a sampler passes it only when the option that needs it is on, so a plain 3-argument callable still works."""


# ---------------------------------------------------------------------------------------------
# Guidance: weight schedules (constant, CogVideoX's dynamic cosine, Imagen Video's oscillating),
# dynamic thresholding of x0, GenTron's motion-free three-pass guidance
# ---------------------------------------------------------------------------------------------

GUIDANCE_SCHEDULES = ("constant", "dynamic_cosine", "oscillating")


@dataclass(frozen=True, kw_only=True, slots=True)
class GuidanceConfig:
    """How a sampler guides. The defaults are CogVideoX's pipeline: constant w = 6, no thresholding."""

    schedule: str = "constant"
    """"constant": ``scale`` at every step. "dynamic_cosine": CogVideoX's ``use_dynamic_cfg``,
    w(t) = 1 + scale (1 - cos(pi ((T - t) / T)^5)) / 2, from 1 at t = T to 1 + scale at t = 0 (see
    :func:`guidance_weights` for how this differs from diffusers' code). "oscillating": Imagen Video's,
    ``high`` for the first ``high_steps`` steps, then low, high, low, ..."""
    scale: float = 6.0
    """w of "constant" and "dynamic_cosine"; v = v_uncond + w (v_text - v_uncond), so 1 is no guidance."""
    high: float = 15.0
    """Oscillating guidance's high weight (Imagen Video: 15)."""
    low: float = 1.0
    """Oscillating guidance's low weight (Imagen Video: 1, i.e. the plain conditional prediction)."""
    high_steps: int = 1
    """Steps at ``high`` before alternating starts; Imagen Video does not publish its count (anchors/dit.md
    section 5), so it is a setting."""
    dynamic_threshold: float | None = None
    """None: off. p in (0, 1]: clip each sample's predicted x0 to [-s, s] and scale it by floor / s, where s
    is the p-quantile of |x0| over that sample, floored at ``threshold_floor`` (Imagen: p = 0.95, floor 1)."""
    threshold_floor: float = 1.0
    """The data range [-floor, floor] and lower bound of s. In pixel space (Imagen) data lie in [-1, 1], so
    1 acts only on what overshoots the data range. Scaled VAE latents are not bounded: they are roughly
    unit-variance, so |x0| has a 0.95 quantile near 2 and a floor of 1 would squeeze every sample into
    [-1, 1], shrinking its contrast. Set the floor to the 0.95 quantile of |latent| on real data (about 2
    for unit-variance latents) so thresholding only touches samples whose prediction overshoots what the
    data do, as high guidance weights cause; it then bounds the latent the VAE decodes, not the pixels."""
    motion_scale: float | None = None
    """None: plain CFG. A float lambda_M: GenTron's motion-free guidance, three passes per step with the
    text weight taken from the schedule (lambda_T; GenTron: 7.5) and lambda_M (GenTron: 1.0 to 1.3) on the
    motion direction; needs a model trained with p_motion_free > 0."""

    def __post_init__(self) -> None:
        if self.schedule not in GUIDANCE_SCHEDULES:
            raise ValueError(f"GuidanceConfig.schedule: expected one of {GUIDANCE_SCHEDULES}, got {self.schedule!r}")
        if self.high_steps < 0:
            raise ValueError(f"GuidanceConfig.high_steps: expected >= 0, got {self.high_steps}")
        if self.dynamic_threshold is not None and not 0 < self.dynamic_threshold <= 1:
            raise ValueError(f"GuidanceConfig.dynamic_threshold: expected None or 0 < p <= 1, got "
                             f"{self.dynamic_threshold}")
        if self.threshold_floor <= 0:
            raise ValueError(f"GuidanceConfig.threshold_floor: expected > 0, got {self.threshold_floor}")


def guidance_weights(cfg: GuidanceConfig, timesteps: torch.Tensor, num_train_timesteps: int = 1000) -> list[float]:
    """The text-guidance weight of each sampling step, in step order, for the (N,) descending ``timesteps``.

    dynamic_cosine: diffusers' pipeline evaluates ``((num_inference_steps - t) / num_inference_steps)^5``
    with t the timestep value (0..999) and N the number of steps, so its base is negative and the
    weight swings arbitrarily (anchors/dit.md section 1.6). The ramp it intends - 1 at pure noise rising
    to 1 + w at t = 0 - is written here with T = num_train_timesteps, which keeps w(t) in [1, 1 + w].
    """
    n = timesteps.shape[0]
    if cfg.schedule == "constant":
        return [float(cfg.scale)] * n
    if cfg.schedule == "dynamic_cosine":
        big_t = float(num_train_timesteps)
        return [1.0 + cfg.scale * (1.0 - math.cos(math.pi * ((big_t - t) / big_t) ** 5.0)) / 2.0
                for t in timesteps.tolist()]
    # oscillating: high for the first high_steps, then low, high, low, ...
    return [cfg.high if i < cfg.high_steps or (i - cfg.high_steps) % 2 else cfg.low for i in range(n)]


def dynamic_threshold(x0: torch.Tensor, percentile: float, floor: float = 1.0) -> torch.Tensor:
    """Imagen's dynamic thresholding with range [-floor, floor]: per sample s = max(floor,
    quantile(|x0|, percentile)) and x0 -> clamp(x0, -s, s) * floor / s.

    floor = 1 is Imagen's rule (clip to [-s, s], divide by s). A larger floor keeps the same rule with
    the data range [-floor, floor]: a sample whose quantile is under the floor is only clipped there
    (a no-op when nothing exceeds it), one above is clipped at s and scaled back into the range.
    """
    flat = x0.float().flatten(1).abs()  # (B, N)
    s = torch.quantile(flat, percentile, dim=1).clamp(min=floor)  # (B,)
    s = _per_sample(s, x0.float())
    return (x0.float().clamp(-s, s) * (floor / s)).to(x0.dtype)


def ddim_step(x_t: torch.Tensor, v_pred: torch.Tensor, t: int, t_prev: int, ac: torch.Tensor,
              threshold: tuple[float, float] | None = None) -> torch.Tensor:
    """One deterministic DDIM step x_t -> x_{t_prev}; t_prev < 0 means the end (alpha_bar = 1).

    ``threshold`` (percentile, floor): dynamically threshold the predicted x0 first. The noise direction
    is then re-derived from x_t and the thresholded x0 (the DDIM posterior mean of Imagen's sampler),
    rather than kept from the model as diffusers' DDIM does.
    """
    a_t = float(ac[t])
    a_prev = float(ac[t_prev]) if t_prev >= 0 else 1.0
    x0 = a_t**0.5 * x_t - (1.0 - a_t) ** 0.5 * v_pred
    if threshold is not None:
        x0 = dynamic_threshold(x0, *threshold)
    # x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps, with eps = (x_t - sqrt(a_t) x0) / sqrt(1 - a_t).
    c_x = ((1.0 - a_prev) / (1.0 - a_t)) ** 0.5
    c_x0 = a_prev**0.5 - a_t**0.5 * c_x
    return c_x * x_t + c_x0 * x0


def cfg_combine(v_uncond: torch.Tensor, v_text: torch.Tensor, w: float) -> torch.Tensor:
    """Classifier-free guidance in v: v_uncond + w (v_text - v_uncond)."""
    return v_uncond + w * (v_text - v_uncond)


def motion_free_combine(v_null_free: torch.Tensor, v_null_motion: torch.Tensor, v_text_motion: torch.Tensor,
                        text_scale: float, motion_scale: float) -> torch.Tensor:
    """GenTron's motion-free guidance, in v (linear in the prediction, so v and eps forms agree):

    v = v(null, free) + lambda_T (v(text, motion) - v(null, motion)) + lambda_M (v(null, motion) - v(null, free)).

    "free" is the motion-free pass (frames do not see each other), "motion" the ordinary one. With
    lambda_M = 1 the first and last terms cancel to v(null, motion): plain CFG with w = lambda_T.
    """
    return (v_null_free + text_scale * (v_text_motion - v_null_motion)
            + motion_scale * (v_null_motion - v_null_free))


@dataclass(frozen=True, slots=True)
class Sample:
    """What a guided sampler returns: the denoised latents and the text-guidance weight of each step."""

    x0: torch.Tensor
    weights: list[float]


@torch.no_grad()
def guided_sample(
    model: Denoiser,
    noise: torch.Tensor,
    text: torch.Tensor,
    *,
    ac: torch.Tensor,
    num_steps: int = 50,
    guidance: GuidanceConfig = GuidanceConfig(),
    null_text: torch.Tensor | None = None,
    conditioning: dict[str, torch.Tensor] | None = None,
    guidance_input: bool = False,
) -> Sample:
    """Denoise ``noise`` (B, T, C, H, W) into x0 with DDIM and the configured guidance.

    CFG runs the unconditional and conditional passes as one batch [null; text], as diffusers' CogVideoX
    pipeline. Motion-free guidance runs three, [null free; null; text], the first with ``motion_free``
    set. ``null_text`` (B or 1, L, E) is the empty-prompt embedding; None skips guidance (weights 1).
    ``conditioning`` holds extra per-sample model inputs, (B,) each (``fps``), repeated per pass.
    ``guidance_input``: the model is a guidance-distilled student (DiT ``guidance_conditioning``): one pass
    per step, given that step's weight as its ``guidance`` input (so any schedule applies); ``null_text`` unused.
    """
    big_t = ac.shape[0]
    b = noise.shape[0]
    steps = ddim_timesteps(num_steps, big_t)
    if guidance_input:
        if guidance.motion_scale is not None:
            raise ValueError("guided_sample: motion-free guidance needs the three passes; a guidance-distilled "
                             "student takes one (expected motion_scale None with guidance_input)")
        null_text = None
        weights = guidance_weights(guidance, steps, big_t)
    else:
        weights = guidance_weights(guidance, steps, big_t) if null_text is not None else [1.0] * num_steps
    mfg = null_text is not None and guidance.motion_scale is not None
    passes = 1 if null_text is None else (3 if mfg else 2)
    if null_text is not None:
        null = null_text.expand_as(text)
        text = torch.cat([null, null, text] if mfg else [null, text])  # (passes * B, L, E)
    extra = {k: torch.cat([v] * passes) for k, v in (conditioning or {}).items()}
    if mfg:
        extra["motion_free"] = torch.arange(passes * b, device=noise.device) < b  # only the first pass
    threshold = None if guidance.dynamic_threshold is None else (guidance.dynamic_threshold, guidance.threshold_floor)
    x = noise
    for t, w in zip(steps.tolist(), weights):
        x_in = torch.cat([x] * passes)
        t_in = torch.full((x_in.shape[0],), t, dtype=torch.int64, device=x.device)
        if guidance_input:
            extra["guidance"] = torch.full((b,), float(w), device=x.device)
        v = model(x_in, text, t_in, **extra).float()
        if mfg:
            v_free, v_null, v_text = v.chunk(3)
            v = motion_free_combine(v_free, v_null, v_text, w, float(guidance.motion_scale))
        elif passes == 2:
            v_uncond, v_text = v.chunk(2)
            v = cfg_combine(v_uncond, v_text, w)
        # diffusers steps to t - T // N even where trailing spacing puts the next timestep elsewhere
        # (N not dividing T); kept so exported models sample the same here and in diffusers.
        x = ddim_step(x.float(), v, t, t - big_t // num_steps, ac, threshold).to(noise.dtype)
    return Sample(x, weights)


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
    """Denoise ``noise`` (B, T, C, H, W) into x0 with DDIM and constant classifier-free guidance.

    As diffusers' CogVideoX pipeline: the unconditional and conditional passes run as one batch
    [null; text], v = v_uncond + w (v_text - v_uncond), and the step after t is t - T // num_steps.
    ``null_text`` (B or 1, L, E) is the empty-prompt embedding; None or guidance_scale == 1 skips CFG.
    """
    use_cfg = null_text is not None and guidance_scale != 1.0
    return guided_sample(model, noise, text, ac=ac, num_steps=num_steps,
                         guidance=GuidanceConfig(scale=guidance_scale), null_text=null_text if use_cfg else None).x0


__all__ = [
    "SCHEDULE_PRESETS",
    "GUIDANCE_SCHEDULES",
    "Denoiser",
    "GuidanceConfig",
    "Sample",
    "ScheduleConfig",
    "alphas_cumprod",
    "cfg_combine",
    "ddim_sample",
    "ddim_step",
    "ddim_timesteps",
    "diffusion_loss",
    "dynamic_threshold",
    "global_stratified_timesteps",
    "guidance_weights",
    "guided_sample",
    "motion_free_combine",
    "motion_free_draw",
    "q_sample",
    "stratified_timesteps",
    "timestep_bins",
    "v_target",
    "x0_from_v",
]
