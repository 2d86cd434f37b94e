"""Progressive distillation: the two-step target is exact, and one round makes a 4-step student closer to
the teacher's 8-step samples than the teacher's own 4-step samples."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from trainer import diffusion as D
from trainer.distill import DistillConfig, distill_round, two_step_target
from trainer.models.dit import DiT, dit_config

AC = D.alphas_cumprod(D.SCHEDULE_PRESETS["tiny"])


def _random_dit(seed: int = 0) -> DiT:
    torch.manual_seed(seed)
    model = DiT(dit_config("tiny")).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    return model


@pytest.mark.parametrize("t", [999, 749, 249])
def test_one_student_step_on_the_target_lands_where_two_teacher_steps_land(t):
    teacher = _random_dit()
    g = torch.Generator().manual_seed(1)
    x_t, text = torch.randn(2, 2, 16, 8, 8, generator=g), torch.randn(2, 8, 32, generator=g)
    null = torch.zeros(1, 8, 32)
    for w, nt in ((1.0, None), (4.0, null)):
        v = two_step_target(teacher, x_t, text, t, 4, AC, guidance_scale=w, null_text=nt)
        one = D.ddim_step(x_t, v, t, t - 250, AC)
        with torch.no_grad():
            x = x_t
            for a, b in ((t, t - 125), (t - 125, t - 250)):
                tt = torch.full((2,), a)
                if nt is None:
                    vt = teacher(x, text, tt)
                else:
                    both = torch.cat([nt.expand_as(text), text])
                    vu, vc = teacher(torch.cat([x, x]), both, torch.cat([tt, tt])).chunk(2)
                    vt = vu + w * (vc - vu)
                x = D.ddim_step(x, vt, a, b, AC)
        torch.testing.assert_close(one, x, rtol=1e-4, atol=1e-4)


def test_bad_step_counts_are_refused():
    with pytest.raises(ValueError, match="student_steps"):
        DistillConfig(student_steps=3)


# Measured (1 thread, seeds fixed): MSE to the teacher's 8-step samples from the same noise is 0.0184 for
# the teacher's own 4-step samples and 0.0137 for the 4-step student after one 400-step round.
@pytest.mark.slow
def test_one_round_brings_the_4_step_student_closer_to_the_teachers_8_steps():
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    # Eight fixed "clips" (2 latent frames of 8x8, 16 channels): smooth patterns that move between frames.
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 8), torch.linspace(-1, 1, 8), indexing="ij")
    amp = torch.randn(8, 1, 16, 1, 1, generator=g)
    x0_all = (amp * torch.sin(3 * xx + 2 * yy + torch.arange(8).reshape(8, 1, 1, 1, 1))).expand(8, 2, 16, 8, 8)
    x0_all = x0_all.contiguous()
    x0_all[:, 1] = x0_all[:, 1].roll(1, dims=-1)
    text_all = torch.randn(8, 8, 32, generator=g)

    torch.manual_seed(0)
    teacher = DiT(dit_config("tiny"))
    opt = torch.optim.AdamW(teacher.parameters(), lr=2e-3)
    for _ in range(400):
        idx = torch.randint(0, 8, (4,), generator=g)
        x0, text = x0_all[idx], text_all[idx]
        t = torch.randint(0, 1000, (4,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        loss = D.diffusion_loss(teacher(D.q_sample(x0, noise, t, AC), text, t), x0, noise, t, AC).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    teacher.eval().requires_grad_(False)

    def data():
        while True:
            idx = torch.randint(0, 8, (4,), generator=g)
            yield x0_all[idx], text_all[idx]

    noise = torch.randn(8, 2, 16, 8, 8, generator=torch.Generator().manual_seed(5))
    t8 = D.ddim_sample(teacher, noise, text_all, ac=AC, num_steps=8, null_text=None)
    t4 = D.ddim_sample(teacher, noise, text_all, ac=AC, num_steps=4, null_text=None)
    student = copy.deepcopy(teacher).requires_grad_(True)
    losses = distill_round(student, teacher, data(), DistillConfig(student_steps=4, train_steps=400, lr=3e-4), AC)
    s4 = D.ddim_sample(student, noise, text_all, ac=AC, num_steps=4, null_text=None)
    teacher_gap, student_gap = (t4 - t8).square().mean().item(), (s4 - t8).square().mean().item()
    assert len(losses) == 400 and all(torch.isfinite(torch.tensor(losses)))
    assert student_gap < teacher_gap, (student_gap, teacher_gap)


# ---------------------------------------------------------------------------------------------
# Guidance distillation and the dit_distill stage
# ---------------------------------------------------------------------------------------------

import dataclasses  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from trainer.distill import (  # noqa: E402
    DistillStageConfig,
    config_from_dict,
    distill_guidance,
    guided_v,
    main,
    student_from_teacher,
)
from trainer.runtime import LocalRun  # noqa: E402

sys.path.append(str(Path(__file__).resolve().parents[1]))  # tests/dit_fixtures.py
import dit_fixtures  # noqa: E402

DISTILL_W = 4.0
"""The guidance weight the stage test samples at (inside the distilled range [1, 8])."""


def test_the_student_starts_as_the_teachers_conditional_prediction_and_w_then_matters():
    teacher = _random_dit()
    student = student_from_teacher(teacher).eval()
    g = torch.Generator().manual_seed(2)
    x, text, t = torch.randn(2, 2, 16, 8, 8, generator=g), torch.randn(2, 8, 32, generator=g), torch.tensor([999, 400])
    with torch.no_grad():
        plain = teacher(x, text, t)
        for w in (1.0, 7.5):
            assert torch.equal(student(x, text, t, guidance=torch.full((2,), w)), plain)  # zero-initialised w embedding
        student.guidance_embedding.linear_2.weight.normal_(0.0, 0.1)
        a, b = (student(x, text, t, guidance=torch.full((2,), w)) for w in (1.0, 7.5))
    assert (a - b).abs().max() > 1e-3
    with pytest.raises(ValueError, match="guidance_conditioning=True expects guidance"):
        student(x, text, t)
    with pytest.raises(ValueError, match="guidance_conditioning=False expects guidance None"):
        teacher(x, text, t, guidance=torch.ones(2))


def test_guided_v_is_cfg_per_sample_and_guidance_distillation_fits_it():
    teacher = _random_dit()
    g = torch.Generator().manual_seed(3)
    x, text, t = torch.randn(2, 2, 16, 8, 8, generator=g), torch.randn(2, 8, 32, generator=g), torch.tensor([700, 200])
    null = torch.zeros(1, 8, 32)
    v = guided_v(teacher, x, text, t, torch.tensor([1.0, 5.0]), null)
    with torch.no_grad():
        vu, vc = teacher(x, null.expand_as(text), t), teacher(x, text, t)
    torch.testing.assert_close(v[0], vc[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(v[1], D.cfg_combine(vu, vc, 5.0)[1], rtol=1e-4, atol=1e-5)

    x0_all, text_all = torch.randn(4, 2, 16, 8, 8, generator=g), torch.randn(4, 8, 32, generator=g)

    def data():
        while True:
            yield x0_all, text_all

    student = student_from_teacher(teacher)
    losses = distill_guidance(student, teacher.requires_grad_(False), data(), AC, null, steps=60, lr=1e-3,
                              guidance_range=(1.0, 8.0))
    assert len(losses) == 60 and sum(losses[-10:]) < 0.5 * sum(losses[:10]), (losses[:10], losses[-10:])


def test_a_guidance_distilled_sampler_gives_each_steps_weight_as_input():
    seen = []

    def model(x, text, t, guidance):
        seen.append((int(t[0]), guidance.tolist()))
        return torch.zeros_like(x)

    cfg = D.GuidanceConfig(schedule="oscillating", high=15.0, low=1.0, high_steps=1)
    out = D.guided_sample(model, torch.randn(2, 1, 4, 2, 2), torch.zeros(2, 3, 5), ac=AC, num_steps=4, guidance=cfg,
                          null_text=torch.zeros(1, 3, 5), guidance_input=True)
    assert out.weights == [15.0, 1.0, 15.0, 1.0]
    assert seen == [(t, [w, w]) for t, w in zip(D.ddim_timesteps(4).tolist(), out.weights)]  # one pass per step


def test_distill_stage_config_names_its_problems():
    base = {"stage": {"kind": "dit_distill"}, "teacher": {"checkpoint": "runs/x"}}
    cfg = config_from_dict(base | {"progressive": {"teacher_steps": 20, "rounds": 2}})
    assert cfg.progressive.student_steps == 5 and config_from_dict(dataclasses.asdict(cfg)) == cfg
    with pytest.raises(ValueError, match="cannot be halved 2 times"):
        config_from_dict(base | {"progressive": {"teacher_steps": 16, "rounds": 2}})
    with pytest.raises(ValueError, match="unknown key.*'roundz'"):
        config_from_dict(base | {"progressive": {"roundz": 1}})
    with pytest.raises(ValueError, match="workers: distillation runs in one process"):
        config_from_dict(base | {"ray": {"workers": 2}})
    with pytest.raises(ValueError, match=r"\[teacher\] checkpoint"):
        DistillStageConfig()


def _sample_setup(sample_dit_run, sample_dit_shards):
    """(teacher, state, text, null, ac, noise(seed), vae, encoder) of the session's tiny DiT trained on the built-in
    sample: its clips' captions through its text encoder, noise shaped as its video bucket's latents."""
    from catalog.config import from_dict
    from trainer.distill import load_teacher
    from trainer.sampling import load_vae
    from trainer.text import TextConfig, TextEncoder

    video, n = sample_dit_run["video"], sample_dit_run["n"]
    _, state, teacher = load_teacher(sample_dit_run["run"], "ema", torch.device("cpu"))
    encoder = TextEncoder(from_dict(TextConfig, dict(state["config"]["text"]), where="text"), torch.device("cpu"))
    text = encoder.encode(_captions(sample_dit_shards, video, n))[0].float()
    null = encoder.empty()[0][None].float()
    ac = D.alphas_cumprod(D.ScheduleConfig(**state["schedule"]))
    vae, _ = load_vae(state["vae_checkpoint"], device=torch.device("cpu"))
    t_lat = (int(video.split("x")[0]) - 1) // vae.cfg.temporal_factor + 1
    h, w = (int(s) // vae.cfg.spatial_factor for s in video.split("x")[1:])

    def noise(seed: int) -> torch.Tensor:
        return torch.randn(n, t_lat, vae.cfg.latent_channels, h, w, generator=torch.Generator().manual_seed(seed))
    return teacher, state, text, null, ac, noise, vae, encoder


def _stage_config(sample_dit_run, sample_dit_shards, steps: int) -> DistillStageConfig:
    video, n = sample_dit_run["video"], sample_dit_run["n"]
    return config_from_dict({
        "stage": {"kind": "dit_distill"},
        "teacher": {"checkpoint": str(sample_dit_run["run"])},
        "data": {"root": str(sample_dit_shards), "buckets": [video], "weights": [1.0], "batch_sizes": [n],
                 "shardshuffle": False, "num_workers": 0},
        "guidance": {"w_min": 1.0, "w_max": 8.0},
        "progressive": {"teacher_steps": 4, "rounds": 1},
        "train": {"steps": steps, "lr": 1e-3, "log_every": 100, "grad_clip": 1.0, "batch_reuse": 4},
        "ray": {"name": "distill"},
    })


@pytest.mark.slow
def test_the_distill_stage_writes_a_2_step_guidance_input_student(dit_assets, sample_dit_shards, sample_dit_run,
                                                                   tmp_path):
    """The stage's mechanics on the sample teacher (what it learns is the next test's): one checkpoint holding a
    w-conditioned student that samples in 2 steps, its phases and losses recorded."""
    torch.set_num_threads(1)
    main(_stage_config(sample_dit_run, sample_dit_shards, steps=STAGE_STEPS),
         LocalRun(tmp_path / "distill", device=torch.device("cpu")))
    teacher, _, text, _, ac, noise, _, _ = _sample_setup(sample_dit_run, sample_dit_shards)
    _, s_state = load_checkpoint_state(tmp_path / "distill")
    assert s_state["distill"]["sampling_steps"] == 2 and s_state["config"]["sample"]["steps"] == 2
    assert s_state["distill"]["guidance"] == {"input": True, "w_min": 1.0, "w_max": 8.0}
    phases = s_state["distill"]["phases"]
    assert [p["phase"] for p in phases] == ["guidance", "round 1"] and all(p["steps"] == STAGE_STEPS for p in phases)
    assert all(math.isfinite(p["first_loss"]) and math.isfinite(p["last_loss"]) for p in phases), phases
    student = student_from_teacher(teacher)
    student.load_state_dict(s_state["ema"])
    out = D.guided_sample(student.eval(), noise(5), text, ac=ac, num_steps=2, guidance=D.GuidanceConfig(scale=DISTILL_W),
                          guidance_input=True)
    assert out.weights == [DISTILL_W, DISTILL_W] and torch.isfinite(out.x0).all()


# Measured (1 thread, seeds fixed, 500 steps a phase; teacher = the session's tiny DiT trained 400 steps on the
# built-in sample's clips, tests/dit_fixtures.py train_sample_dit; MSE over its clips' captions, noise seeds 5 and 6):
#   guidance distillation: the w-input student's 4 steps are 0.152-0.153 from the teacher's 4 guided steps (w = 4),
#     where the teacher's unguided 4 steps are 1.83-1.86 away: the guidance is in the one pass;
#   one progressive round 4 -> 2: the 2-step student is 0.069-0.070 from its round teacher's 4 steps, that teacher's
#     own 2 steps 0.107-0.110.
# End to end (the 2-step student against the original teacher's 4 guided steps) the figure adds both phases' errors
# and moves with the guidance phase: 0.126-0.130 here against the teacher's own 2 steps' 0.126-0.128, and 0.09-0.22
# in stage runs of 500-1500 steps a phase, so it is printed, not asserted (last stop's 0.1665 vs 0.3303 was on a
# teacher trained with other package versions). ~60 s beyond the shared fixtures: slow.
@pytest.mark.slow
def test_guidance_distillation_then_one_round_each_do_their_part_on_the_sample_teacher(
        dit_assets, sample_dit_shards, sample_dit_run):
    from trainer.distill import _batches

    torch.set_num_threads(1)
    teacher, state, text, null, ac, noise, vae, encoder = _sample_setup(sample_dit_run, sample_dit_shards)
    cfg = _stage_config(sample_dit_run, sample_dit_shards, steps=PHASE_STEPS)
    data = _batches(cfg, vae, encoder, float(state["latent_scale"]), torch.device("cpu"))
    wr = (cfg.guidance.w_min, cfg.guidance.w_max)
    guided = student_from_teacher(teacher)
    distill_guidance(guided, teacher, data, ac, null, steps=PHASE_STEPS, lr=cfg.train.lr, guidance_range=wr,
                     grad_clip=cfg.train.grad_clip)
    guided.eval().requires_grad_(False)
    student = copy.deepcopy(guided).requires_grad_(True)
    distill_round(student, guided, data, DistillConfig(student_steps=2, train_steps=PHASE_STEPS, lr=cfg.train.lr,
                                                       seed=1, grad_clip=cfg.train.grad_clip), ac, guidance_range=wr)
    data.close()
    student.eval()

    g = D.GuidanceConfig(scale=DISTILL_W)
    for seed in (5, 6):
        z = noise(seed)
        t4 = D.guided_sample(teacher, z, text, ac=ac, num_steps=4, guidance=g, null_text=null).x0
        t4_unguided = D.ddim_sample(teacher, z, text, ac=ac, num_steps=4, null_text=None)
        g4, g2, s2 = (D.guided_sample(m, z, text, ac=ac, num_steps=k, guidance=g, guidance_input=True).x0
                      for m, k in ((guided, 4), (guided, 2), (student, 2)))
        t2 = D.guided_sample(teacher, z, text, ac=ac, num_steps=2, guidance=g, null_text=null).x0
        gap = {name: (a - b).square().mean().item() for name, (a, b) in {
            "guided4_vs_teacher4": (g4, t4), "unguided4_vs_teacher4": (t4_unguided, t4),
            "student2_vs_guided4": (s2, g4), "guided2_vs_guided4": (g2, g4),
            "student2_vs_teacher4": (s2, t4), "teacher2_vs_teacher4": (t2, t4)}.items()}
        print(f"noise {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in gap.items()))
        assert gap["guided4_vs_teacher4"] < 0.25 * gap["unguided4_vs_teacher4"], gap
        assert gap["student2_vs_guided4"] < gap["guided2_vs_guided4"], gap


STAGE_STEPS = 20
PHASE_STEPS = 500


def load_checkpoint_state(run: Path):
    from trainer.checkpoint import latest_checkpoint, load_checkpoint

    folder = latest_checkpoint(run)
    state, _ = load_checkpoint(folder, rank=0)
    return folder, state


def _captions(root: Path, bucket: str, n: int) -> list[str]:
    from trainer.data import DiTBatches, DiTDataConfig

    data = DiTDataConfig(root=str(root), buckets=(bucket,), weights=(1.0,), batch_sizes=(n,), shardshuffle=False,
                         num_workers=0)
    return next(iter(DiTBatches(data, seed=0)))["captions"]
