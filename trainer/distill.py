"""Progressive distillation (Salimans & Ho 2022, as Imagen Video uses it): a student initialised from
the teacher learns to take one DDIM step where the teacher takes two, halving the step count per round
(N -> N/2). Plain functions over a Denoiser (trainer.diffusion), v-parameterisation throughout.

One round, for a student sampling with N steps on the grid of trainer.diffusion.ddim_timesteps(N):

1. a training x_t = q_sample(x0, eps, t) at a student grid time t, its next time t' = t - T/N;
2. the teacher steps t -> t - T/(2N) -> t' with two deterministic DDIM steps (classifier-free guided
   with weight w when a null text is given), landing at x_{t'};
3. the student's target is the x0 (and so the v) whose single DDIM step t -> t' lands on the same
   x_{t'}: x0~ = (x_{t'} - c_x x_t) / c_x0 with ddim_step's coefficients c_x, c_x0 for (t, t');
4. the loss is the v-MSE against that target (the DiT stage's loss, x0-MSE weighted 1 / (1 - alpha_bar)).

Not here yet: Imagen Video's first stage (distilling guidance into a student that takes w as an input)
and a ``[stage] kind`` with its TOML config; ``docs/cascade.md`` says how they would sit on the trainer.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from trainer.diffusion import Denoiser, cfg_combine, ddim_step, ddim_timesteps, q_sample


@dataclass(frozen=True, kw_only=True, slots=True)
class DistillConfig:
    student_steps: int = 4
    """N of this round: the student samples with N steps, the teacher with 2N."""
    train_steps: int = 500
    lr: float = 1e-4
    guidance_scale: float = 1.0
    """The teacher's CFG weight w baked into the student (1 = the conditional prediction alone)."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.student_steps < 1 or 1000 % (2 * self.student_steps):
            raise ValueError(f"DistillConfig.student_steps: expected N >= 1 with 2N dividing 1000 (the teacher's "
                             f"grid then contains the student's), got {self.student_steps}")
        if self.train_steps < 1 or self.lr <= 0:
            raise ValueError(f"DistillConfig: expected train_steps >= 1 and lr > 0, got {self.train_steps}, {self.lr}")


def _v(model: Denoiser, x: torch.Tensor, text: torch.Tensor, t: int, w: float, null_text: torch.Tensor | None
       ) -> torch.Tensor:
    tt = torch.full((x.shape[0],), t, dtype=torch.int64, device=x.device)
    if null_text is None or w == 1.0:
        return model(x, text, tt).float()
    both = torch.cat([null_text.expand_as(text), text])  # (2B, L, E): [null; text], as the sampler
    v_u, v_c = model(torch.cat([x, x]), both, torch.cat([tt, tt])).float().chunk(2)
    return cfg_combine(v_u, v_c, w)


@torch.no_grad()
def two_step_target(teacher: Denoiser, x_t: torch.Tensor, text: torch.Tensor, t: int, student_steps: int,
                    ac: torch.Tensor, *, guidance_scale: float = 1.0, null_text: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """The v target (B, T, C, H, W) of one student step from x_t at time t: the v whose DDIM step
    t -> t - T/N lands where two teacher steps t -> t - T/2N -> t - T/N land."""
    big_t = ac.shape[0]
    t_mid, t_next = t - big_t // (2 * student_steps), t - big_t // student_steps
    x_mid = ddim_step(x_t, _v(teacher, x_t, text, t, guidance_scale, null_text), t, t_mid, ac)
    x_next = ddim_step(x_mid, _v(teacher, x_mid, text, t_mid, guidance_scale, null_text), t_mid, t_next, ac)
    a_t = float(ac[t])
    a_next = float(ac[t_next]) if t_next >= 0 else 1.0
    c_x = ((1.0 - a_next) / (1.0 - a_t)) ** 0.5
    c_x0 = a_next**0.5 - a_t**0.5 * c_x  # > 0 since a_next > a_t
    x0 = (x_next - c_x * x_t) / c_x0
    return (a_t**0.5 * x_t - x0) / (1.0 - a_t) ** 0.5  # v = (sqrt(a) x_t - x0) / sqrt(1 - a)


def distill_round(student: nn.Module, teacher: Denoiser, data: Iterator[tuple[torch.Tensor, torch.Tensor]],
                  cfg: DistillConfig, ac: torch.Tensor, *, null_text: torch.Tensor | None = None) -> list[float]:
    """Train ``student`` (initialised from the teacher) for one round; ``data`` yields (x0 (B, T, C, H, W),
    text (B, L, E)). Returns the loss of every step. Grid times are drawn per sample from the student's
    N-step grid with a generator seeded by cfg.seed."""
    grid = ddim_timesteps(cfg.student_steps, ac.shape[0])  # (N,)
    g = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=0.0)
    student.train()
    losses = []
    for _ in range(cfg.train_steps):
        x0, text = next(data)
        b = x0.shape[0]
        t = grid[torch.randint(0, len(grid), (1,), generator=g)].item()  # one grid time per batch: one target pass
        noise = torch.randn(x0.shape, generator=g).to(x0.device)
        tt = torch.full((b,), t, dtype=torch.int64, device=x0.device)
        x_t = q_sample(x0, noise, tt, ac)
        target = two_step_target(teacher, x_t, text, t, cfg.student_steps, ac, guidance_scale=cfg.guidance_scale,
                                 null_text=null_text)
        loss = (student(x_t, text, tt).float() - target).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    student.eval()
    return losses


__all__ = ["DistillConfig", "distill_round", "two_step_target"]
