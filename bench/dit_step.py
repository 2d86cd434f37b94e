"""DiT training-step throughput against diffusers' CogVideoXTransformer3DModel, and MFU on CUDA.

    python bench/dit_step.py                                   # tiny preset on CPU, one thread
    python bench/dit_step.py --preset 2b --latent 13x60x90     # on a GPU: 49 frames at 480x720

Both models are built from the same config with the same weights (our state dict loads into
diffusers' model as is) and run the same step: forward on (B, T, C, H, W) latents, text embeddings
and timesteps, a mean-square loss on the output, backward. CUDA runs under bf16 autocast with fp32
weights (the trainer's setting), CPU in fp32. The two models alternate, ``--rounds`` times
``--steps`` timed steps each after ``--warmup`` steps, and each model's best round is reported
(the least disturbed by whatever else runs on the machine). On CPU the clock is the process's CPU
time, so other processes on a shared machine do not count against either model.

Tokens per sample = text tokens + latent patches (every token passes through every block).
MFU = flops_per_token * tokens/s / peak, with trainer.models.dit.flops_per_token (torchtitan's
6 N over per-token parameters + 12 L D S attention; adaLN and the timestep MLP left out) and the
dense bf16 peak of the GPU (H100/H200 989 TFLOP/s, A100 312).

Lines: one per model, then ``ratio_vs_diffusers=X`` (our tokens/s over diffusers', target >= 1.0),
on CUDA ``mfu=...``, and with ``--loader`` the loader half's ``loader_ratio=Y``.

``--latte`` adds Latte's four factorised variants (trainer/models/latte.py) at the DiT's depth and
width on the same latents: one line each with tokens/s (the DiT's tokens per sample, so the numbers
compare samples/s) and ``vs_full=X``, their speed over full attention (CogVideoX's Table 8 reports
2D+1D ~1.7x faster per step at 480x720, 49 frames).
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
import types
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trainer.export import transformer_config  # noqa: E402
from trainer.models.dit import DiT, dit_config, flops_per_token  # noqa: E402
from trainer.models.latte import LATTE_VARIANTS, Latte, latte_flops, latte_from_dit  # noqa: E402

# Dense bf16 peaks (torchtitan tools/utils.py get_peak_flops; 2:4 sparsity not counted).
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}


def peak_flops(device_name: str) -> float | None:
    for key, peak in PEAK_FLOPS.items():
        if key in device_name:
            return peak
    return None


def diffusers_twin(ours: DiT):
    """diffusers' CogVideoXTransformer3DModel of the same config, holding our weights."""
    from diffusers import CogVideoXTransformer3DModel

    kwargs = {k: v for k, v in transformer_config(ours.cfg).items() if not k.startswith("_")}
    ref = CogVideoXTransformer3DModel(**kwargs)
    ref.load_state_dict(ours.state_dict(), strict=True)
    if ours.cfg.checkpointing:
        ref.enable_gradient_checkpointing()
    return ref


def diffusers_rotary(ref, frames: int, h: int, w: int, device: torch.device):
    """image_rotary_emb exactly as diffusers' CogVideoX pipeline computes it (None for sin-cos)."""
    if not ref.config.use_rotary_positional_embeddings:
        return None
    from diffusers import CogVideoXPipeline

    pipe = types.SimpleNamespace(transformer=ref, vae_scale_factor_spatial=8)
    return CogVideoXPipeline._prepare_rotary_positional_embeddings(pipe, h * 8, w * 8, frames, device)


def timed_steps(step, steps: int, device: torch.device) -> float:
    """Seconds for ``steps`` steps: wall time on CUDA; on CPU this process's CPU time, which the other
    processes of a shared machine do not inflate (with one thread it is the compute time)."""
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = clock()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return clock() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default=None, help="DiT preset (default: 2b on CUDA, tiny on CPU)")
    ap.add_argument("--layers", type=int, default=None, help="override the preset's number of blocks")
    ap.add_argument("--latent", default=None, help="latent FxHxW (default: 13x60x90 on CUDA, 4x16x16 on CPU)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--checkpointing", action="store_true", help="activation checkpointing per block (both models)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads")
    ap.add_argument("--latte", action="store_true", help="also time Latte's four variants at the DiT's sizes")
    ap.add_argument("--loader", action="store_true", help="also run the loader half (bench/dit_loader.py)")
    ap.add_argument("--loader-workers", type=int, default=2)
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    preset = args.preset or ("2b" if device.type == "cuda" else "tiny")
    overrides = {"checkpointing": args.checkpointing}
    if args.layers is not None:
        overrides["num_layers"] = args.layers
    cfg = dit_config(preset, **overrides)
    frames, h, w = (int(v) for v in (args.latent or ("13x60x90" if device.type == "cuda" else "4x16x16")).split("x"))

    torch.manual_seed(0)
    ours = DiT(cfg)
    with torch.no_grad():  # SAT init closes every gate; random weights make both models do all the work
        for p in ours.parameters():
            p.normal_(0.0, 0.02)
    ref = diffusers_twin(ours)
    ours, ref = ours.to(device).train(), ref.to(device).train()

    b, p = args.batch, cfg.patch_size
    seq = cfg.max_text_len + (frames // (cfg.patch_size_t or 1)) * (h // p) * (w // p)
    latents = torch.randn(b, frames, cfg.in_channels, h, w, device=device)
    text = torch.randn(b, cfg.max_text_len, cfg.text_dim, device=device)
    t = torch.randint(0, 1000, (b,), device=device)
    rotary = diffusers_rotary(ref, frames, h, w, device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    def step_ours():
        with autocast:
            y = ours(latents, text, t)
        y.float().square().mean().backward()

    def step_ref():
        with autocast:
            y = ref(latents, text, t, image_rotary_emb=rotary, return_dict=False)[0]
        y.float().square().mean().backward()

    steps = {"ours": step_ours, "diffusers": step_ref}
    lattes = {}
    if args.latte:
        for variant in LATTE_VARIANTS:
            torch.manual_seed(0)
            m = Latte(latte_from_dit(cfg, variant))
            with torch.no_grad():
                for prm in m.parameters():
                    prm.normal_(0.0, 0.02)
            lattes[f"latte_{variant}"] = m.to(device).train()

        def latte_step(m):
            def step():
                with autocast:
                    y = m(latents, text, t)
                y.float().square().mean().backward()
            return step

        steps |= {name: latte_step(m) for name, m in lattes.items()}
    for fn in steps.values():
        for _ in range(args.warmup):
            fn()
    best = {name: float("inf") for name in steps}
    peak_mem = {}
    for _ in range(args.rounds):
        for name, fn in steps.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            best[name] = min(best[name], timed_steps(fn, args.steps, device))
            if device.type == "cuda":
                peak_mem[name] = torch.cuda.max_memory_allocated() / 2**30

    tokens = b * seq * args.steps
    rate = {name: tokens / sec for name, sec in best.items()}
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {args.threads} thread(s)"
    print(f"DiT {preset} ({cfg.num_layers} layers x {cfg.num_heads} heads x {cfg.head_dim}, {cfg.pos_embed}), "
          f"latent {frames}x{h}x{w}, batch {b}, {seq} tokens/sample, {where}"
          f"{', bf16 autocast' if device.type == 'cuda' else ', fp32'}{', checkpointing' if cfg.checkpointing else ''}")
    for name in steps:
        mem = f", peak {peak_mem[name]:.1f} GiB" if name in peak_mem else ""
        print(f"{name}: {rate[name]:,.0f} tokens/s, {b * args.steps / best[name]:.3f} samples/s, "
              f"{best[name] / args.steps * 1e3:.1f} ms/step{mem}")
    print(f"ratio_vs_diffusers={rate['ours'] / rate['diffusers']:.3f}")
    for name, m in lattes.items():
        fl = latte_flops(m.cfg, frames, h // p, w // p, cfg.max_text_len)
        print(f"{name}_vs_full={rate[name] / rate['ours']:.3f} (flops/sample {fl / 1e9:,.1f} GFLOP against "
              f"{flops_per_token(cfg, seq) * seq / 1e9:,.1f} for full attention)")
    if device.type == "cuda":
        peak = peak_flops(torch.cuda.get_device_name())
        fpt = flops_per_token(cfg, seq)
        achieved = fpt * rate["ours"]
        print(f"flops/token {fpt / 1e9:.2f} GFLOP, achieved {achieved / 1e12:.1f} TFLOP/s")
        if peak is None:
            print(f"mfu: unknown peak for {torch.cuda.get_device_name()!r}")
        else:
            print(f"mfu={100 * achieved / peak:.1f}%")

    # ---- loader half: bench/dit_loader.py (another helper's) turns our step rate into loader_ratio= ----
    # The demand is this DiT step alone (latents precomputed), the stricter case: encoding latents on
    # the fly makes each step slower and the loader's job easier. On CPU the step rate comes from CPU
    # time (the uncontended rate), which is stricter again than the wall-clock rate the loader gets.
    if args.loader:
        import tempfile

        sys.path.insert(0, str(REPO / "bench"))
        from dit_loader import bench_loader  # noqa: E402

        from trainer.synthetic import write_synthetic_shards  # noqa: E402

        bucket = f"{(frames - 1) * cfg.temporal_compression + 1}x{h * 8}x{w * 8}"  # pixels of this latent
        with tempfile.TemporaryDirectory(prefix="dit_step_") as root:
            write_synthetic_shards(root, {bucket: list(range(4 * b + 8))}, per_shard=4)
            bench_loader(root, bucket, batch_size=b, workers=args.loader_workers, steps=12,
                         demand_samples_per_s=b * args.steps / best["ours"])

if __name__ == "__main__":
    main()
