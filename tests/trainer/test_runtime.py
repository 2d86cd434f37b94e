"""The shared training runtime: schedule, EMA, seeds, reduction across ranks, the checkpoint cycle, MFU."""
from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from catalog.config import from_dict
from trainer.config import AdamWConfig
from trainer.metrics import MetricWindow, matmul_params, mfu_percent, transformer_flops_per_token
from trainer.runtime import (
    EMA,
    LocalRun,
    LRSchedule,
    autocast_for,
    find_resume,
    load_init,
    load_optimizer_state,
    model_state,
    optimizer_state,
    rank_seed,
    reduce_mean,
    reduce_sum,
    restore_rng,
    rng_state,
    save_and_report,
    seed_everything,
    set_lr,
    set_rng_state,
)

# ---------------------------------------------------------------------------------------------
# Learning-rate schedule
# ---------------------------------------------------------------------------------------------


def test_warmup_then_constant() -> None:
    lr = LRSchedule(peak=1e-3, warmup_steps=10)
    assert [lr(s) for s in (1, 5, 10, 11, 5000)] == pytest.approx([1e-4, 5e-4, 1e-3, 1e-3, 1e-3])
    assert LRSchedule(peak=1e-3)(1) == 1e-3  # no warm-up: the peak from the first step


def test_warmup_then_cosine_to_a_floor() -> None:
    lr = LRSchedule(peak=1e-4, warmup_steps=100, kind="cosine", total_steps=1100, floor=1e-6)
    assert lr(50) == pytest.approx(5e-5)                        # half-way up the warm-up
    assert lr(100) == pytest.approx(1e-4)                       # peak at the end of warm-up
    assert lr(350) == pytest.approx(1e-6 + 99e-6 * (1 + math.cos(math.pi / 4)) / 2)  # a quarter down
    assert lr(600) == pytest.approx(1e-6 + 99e-6 / 2)           # half-way: midpoint of peak and floor
    assert lr(1100) == pytest.approx(1e-6) and lr(5000) == pytest.approx(1e-6)  # floor, then held
    values = [lr(s) for s in range(100, 1101)]
    assert all(a >= b for a, b in zip(values, values[1:]))      # never rises after the peak


def test_schedule_rejects_what_it_cannot_mean() -> None:
    with pytest.raises(ValueError, match="cosine needs total_steps > warmup_steps"):
        LRSchedule(peak=1e-4, warmup_steps=100, kind="cosine", total_steps=100)
    with pytest.raises(ValueError, match="expected 'constant' or 'cosine', got 'linear'"):
        LRSchedule(peak=1e-4, kind="linear")
    with pytest.raises(ValueError, match="floor"):
        LRSchedule(peak=1e-4, kind="cosine", total_steps=10, floor=1e-3)


def test_adamw_section_defaults_to_the_cogvideox_recipe() -> None:
    oc = from_dict(AdamWConfig, {"lr": 2e-4, "warmup_steps": 10})
    opt = oc.optimizer(nn.Linear(2, 2).parameters())
    assert (opt.defaults["betas"], opt.defaults["eps"], opt.defaults["weight_decay"]) == ((0.9, 0.95), 1e-8, 1e-4)
    assert oc.grad_clip == 1.0
    lr = oc.lr_schedule(total_steps=110)
    assert (lr(5), lr(10), lr(60), lr(110)) == pytest.approx((1e-4, 2e-4, 1e-4, 0.0))
    with pytest.raises(ValueError, match="unknown key"):
        from_dict(AdamWConfig, {"beta": [0.9, 0.9]})
    with pytest.raises(ValueError, match="expected 'constant' or 'cosine', got 'step'"):
        AdamWConfig(schedule="step")


def test_set_lr_sets_every_group() -> None:
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    opt = torch.optim.AdamW([{"params": a.parameters()}, {"params": b.parameters(), "lr": 5.0}], lr=1.0)
    set_lr(opt, 0.25)
    assert [g["lr"] for g in opt.param_groups] == [0.25, 0.25]


def test_autocast_is_fp32_on_cpu() -> None:
    with autocast_for(torch.device("cpu"), "auto"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    with pytest.raises(ValueError, match="expected precision 'auto' or 'fp32', got 'bf16'"):
        autocast_for(torch.device("cpu"), "bf16")


# ---------------------------------------------------------------------------------------------
# EMA
# ---------------------------------------------------------------------------------------------


def test_ema_is_the_exponential_average_of_the_weights() -> None:
    model = nn.Linear(3, 2)
    start = model.weight.detach().clone()
    ema = EMA(model, decay=0.75)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    torch.testing.assert_close(ema.module.weight, start + 0.25)  # (1 - decay) of the way
    for _ in range(9):
        ema.update(model)
    # With the model held still the gap shrinks by `decay` per update: e_n - m = (e_0 - m) * decay^n.
    torch.testing.assert_close(ema.module.weight, model.weight.detach() - 0.75**10, rtol=0, atol=1e-6)
    assert not any(p.requires_grad for p in ema.module.parameters())

    copy_ = EMA(nn.Linear(3, 2), decay=0.5)
    copy_.load_state_dict(ema.state_dict())
    torch.testing.assert_close(copy_.module.weight, ema.module.weight)
    with pytest.raises(ValueError, match=r"expected a value in \[0, 1\], got 1.5"):
        EMA(model, decay=1.5)


def test_ema_weights_swap_in_and_back_out() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 2))
    ema = EMA(model, decay=0.0)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-2.0)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(5, 4)
    with ema.swapped_into(model) as swapped:
        torch.testing.assert_close(swapped(x), ema.module(x))
    for k, v in model.state_dict().items():
        assert torch.equal(v, trained[k]), k
    with pytest.raises(RuntimeError, match="inside"), ema.swapped_into(model):
        raise RuntimeError("inside")
    for k, v in model.state_dict().items():
        assert torch.equal(v, trained[k]), f"{k} not restored after an exception"


# ---------------------------------------------------------------------------------------------
# Seeds and RNG state
# ---------------------------------------------------------------------------------------------


def _draws() -> tuple[float, float, list[float]]:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_seeds_are_reproducible_and_differ_per_rank() -> None:
    seed_everything(rank_seed(7, 0))
    a = _draws()
    seed_everything(rank_seed(7, 0))
    assert _draws() == a
    seed_everything(rank_seed(7, 1))
    assert _draws() != a
    assert len({rank_seed(s, r) for s in range(3) for r in range(8)}) == 24


def test_rng_state_restores_every_stream() -> None:
    seed_everything(3)
    _draws()
    saved = rng_state()
    expected = _draws()
    seed_everything(99)
    set_rng_state(saved)
    assert _draws() == expected


# ---------------------------------------------------------------------------------------------
# Reduction and metric windows
# ---------------------------------------------------------------------------------------------


def test_reduction_without_a_process_group_is_identity() -> None:
    assert reduce_sum([1.5, 2.0], torch.device("cpu")) == [1.5, 2.0]
    assert reduce_mean([1.5, 2.0], torch.device("cpu")) == [1.5, 2.0]


def test_metric_window_means_over_the_steps_that_reported() -> None:
    w = MetricWindow()
    w.add({"loss": 1.0}, samples=2, frames=10)
    w.add({"loss": 3.0, "loss_d": 0.5}, samples=2, frames=10)  # the discriminator starts on step 2
    out = w.reduce(torch.device("cpu"))
    assert out["loss"] == 2.0 and out["loss_d"] == 0.5
    assert out["frames_per_s"] == pytest.approx(5 * out["samples_per_s"]) and out["samples_per_s"] > 0
    assert set(out) == {"loss", "loss_d", "samples_per_s", "frames_per_s", "step_time_s"}
    w.add({"loss": 7.0}, samples=1)
    assert w.reduce(torch.device("cpu"))["loss"] == 7.0  # reduce starts a new window


# Two gloo ranks in two processes: scalars reduce across ranks, ranks with different metric keys line
# up, and EMA update/swap work on FSDP2-sharded parameters (each rank holds half of each weight).
TWO_RANKS = textwrap.dedent('''
    import json, sys
    import torch, torch.distributed as dist
    from torch import nn
    from torch.distributed.fsdp import fully_shard
    from trainer.metrics import MetricWindow
    from trainer.runtime import EMA, reduce_mean, reduce_sum
    rank, init = int(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    cpu = torch.device("cpu")
    out = {"sum": reduce_sum([1.0 + rank, 10.0], cpu), "mean": reduce_mean([1.0 + rank], cpu)}
    w = MetricWindow()
    w.add({"loss": 1.0 + rank, f"loss_t{rank}": 4.0 + rank}, samples=2)
    out["window"] = {k: v for k, v in w.reduce(cpu).items() if k.startswith("loss") or k == "samples_per_s"}
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 2))
    ema = EMA(model, decay=0.5)
    for block in model:
        fully_shard(block)
    fully_shard(model)
    out["sharded"] = [tuple(p.to_local().shape) for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.to_local().add_(1.0)
    ema.update(model)
    x = torch.ones(3, 4)
    with torch.no_grad():
        before = model(x)
        with ema.swapped_into(model):
            inside = model(x)
        after = model(x)
    out["swap_max_diff"] = float((inside - ema.module(x)).abs().max())
    out["ema_first_bias"] = float(ema.module[0].bias[0])
    out["after_equals_trained"] = bool(torch.equal(after, before))
    out["after_differs_from_ema"] = bool((after - inside).abs().max() > 1e-3)
    print(json.dumps(out))
    dist.destroy_process_group()
''')


@pytest.mark.slow  # two fresh Python processes importing torch: ~10-25 s on the shared 2-core machine
def test_two_ranks_reduce_and_shard_the_ema(tmp_path: Path) -> None:
    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANKS)
    init = f"file://{tmp_path / 'pg'}"
    env = os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    procs = [subprocess.Popen([sys.executable, str(script), str(r), init], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for r in range(2)]
    results = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, stderr[-3000:]
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 2))
    for r in results:
        assert r["sum"] == [3.0, 20.0] and r["mean"] == [1.5]
        # loss is on both ranks (mean 1.5); each loss_t<r> only on its own rank, so its mean is its value.
        assert r["window"]["loss"] == 1.5 and r["window"]["loss_t0"] == 4.0 and r["window"]["loss_t1"] == 5.0
        assert r["window"]["samples_per_s"] > 0
        assert r["sharded"][0] == [3, 4]  # Linear(4, 6).weight split over 2 ranks: really sharded
        # EMA of (w, w + 1) at decay 0.5 = w + 0.5, gathered from both shards.
        assert r["ema_first_bias"] == pytest.approx(reference[0].bias[0].item() + 0.5)
        assert r["swap_max_diff"] < 1e-6  # inside the block the sharded model computes the EMA network
        assert r["after_equals_trained"] and r["after_differs_from_ema"]  # and the trained weights came back


# ---------------------------------------------------------------------------------------------
# The checkpoint cycle
# ---------------------------------------------------------------------------------------------


def _build(seed: int) -> tuple[nn.Module, torch.optim.Optimizer, EMA]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 16), nn.GELU(), nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=1e-4)
    return model, opt, EMA(model, decay=0.9)


def _step(model: nn.Module, opt: torch.optim.Optimizer, ema: EMA) -> float:
    """One step whose data and noise come from the global RNG, so a wrong RNG restore changes it."""
    x = torch.randn(8, 4)
    target = x.flip(1) + 0.1 * torch.randn(8, 4)
    loss = nn.functional.mse_loss(model(x), target)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    ema.update(model)
    return float(loss.detach())


def _state(model: nn.Module, opt: torch.optim.Optimizer, ema: EMA, step: int) -> dict:
    return {"model": model_state(model), "opt": optimizer_state(model, opt), "ema": ema.state_dict(),
            "step": step}


def test_resume_gives_the_identical_next_step(tmp_path: Path) -> None:
    model, opt, ema = _build(seed=0)
    seed_everything(rank_seed(0, 0))
    run = LocalRun(tmp_path / "run", device=torch.device("cpu"))
    for step in (1, 2):
        _step(model, opt, ema)
    save_and_report(run, 2, {"step": 2}, _state(model, opt, ema, 2),
                    extras=lambda folder: (folder / "sample.txt").write_text("beside the checkpoint"))
    straight = [_step(model, opt, ema) for _ in range(2)]

    # A new process: other initial weights and another RNG stream, until the checkpoint is restored.
    model2, opt2, ema2 = _build(seed=123)
    seed_everything(5)
    resume = find_resume(LocalRun(tmp_path / "run", device=torch.device("cpu")))
    assert resume is not None and resume.step == 2
    assert (resume.folder / "sample.txt").read_text() == "beside the checkpoint"
    model2.load_state_dict(resume.state["model"])
    load_optimizer_state(model2, opt2, resume.state["opt"])
    ema2.load_state_dict(resume.state["ema"])
    restore_rng(resume)
    resumed = [_step(model2, opt2, ema2) for _ in range(2)]

    assert resumed == straight  # bit-exact, not approximately
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    for (k, a), b in zip(ema.state_dict().items(), ema2.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_fresh_run_and_init_from(tmp_path: Path) -> None:
    assert find_resume(LocalRun(tmp_path / "empty", device=torch.device("cpu"))) is None
    restore_rng(None)  # a fresh run has nothing to restore
    with pytest.raises(FileNotFoundError, match="expected a checkpoint under"):
        load_init(tmp_path / "empty")
    model, opt, ema = _build(seed=0)
    run = LocalRun(tmp_path / "stage1", device=torch.device("cpu"))
    for step in (1, 2, 3):
        _step(model, opt, ema)
        save_and_report(run, step, {"step": step}, _state(model, opt, ema, step))
    folder, state = load_init(tmp_path / "stage1")
    assert folder.name == "checkpoint_000003" and state["step"] == 3
    for k, v in ema.state_dict().items():
        assert torch.equal(state["ema"][k], v), k
    assert [m["step"] for m in run.history] == [1, 2, 3]


# ---------------------------------------------------------------------------------------------
# Throughput accounting
# ---------------------------------------------------------------------------------------------


def test_flops_per_token_and_mfu() -> None:
    # CogVideoX-2B at 49x480x720 (anchors/dit.md section 7): 30 x (4 D^2 + 2 D 4D) per-token matmul
    # parameters, D = 1920, S = 17,776 tokens -> about 20.2 GFLOP per token.
    d = 1920
    n = 30 * (4 * d * d + 2 * d * 4 * d)
    flops = transformer_flops_per_token(n, layers=30, width=d, seq_len=17_776)
    assert flops == pytest.approx(20.2e9, rel=0.01)
    assert mfu_percent(tokens_per_s=20_000, flops_per_token=flops, peak_flops=989e12) == pytest.approx(
        100 * flops * 20_000 / 989e12)
    with pytest.raises(ValueError, match="positive peak_flops"):
        mfu_percent(1.0, 1.0, 0.0)


def test_matmul_params_leave_out_per_sample_layers() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.Linear(8, 8)          # per token
            self.adaln = nn.Linear(4, 48)        # per sample: excluded
            self.embed = nn.Embedding(100, 8)    # a lookup, not a matmul

    assert matmul_params(Block(), exclude=("adaln",)) == 64
    assert matmul_params(Block()) == 64 + 4 * 48
