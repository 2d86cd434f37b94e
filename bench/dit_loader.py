"""DiT loader speed against the training step's demand: can the DataLoader workers keep the step fed?

    python bench/dit_loader.py [--bucket 49x256x384] [--clips 16] [--batch 1] [--workers 2] [--steps 24]
                               [--dit-preset tiny] [--vae-preset tiny] [--demand SAMPLES_PER_S]

1. Loader: synthetic clips of the bucket written as shards (``trainer.synthetic``), read by
   ``trainer.data.DiTBatches`` with ``--workers`` DataLoader workers and a consumer that does nothing,
   so the figure is the loader's capacity in samples/s (steady state, after the workers' first
   prefetched batches); the same with no workers (decode in the training process) for comparison.
2. Demand: the samples/s of what the training process does per step with on-the-fly latents: the
   frozen VAE's encode of the batch plus the DiT's forward and backward at that latent shape
   (``--dit-preset``, ``--vae-preset``; CUDA with bf16 autocast when present, else CPU fp32). Text is a
   random (B, L, text_dim) tensor: the T5 encode is not counted. ``--demand`` skips this measurement
   and uses the given figure (e.g. a GPU step rate measured by bench/dit_step.py).

Last line: ``loader_ratio=Y`` (loader samples/s over step samples/s; >= 2 means decoding never
starves the step). ``bench_loader`` is the loader half for bench/dit_step.py to call with its own demand.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from catalog.shards import parse_bucket  # noqa: E402
from trainer.data import DiTBatches, DiTDataConfig, pixels_to_float  # noqa: E402
from trainer.synthetic import write_synthetic_shards  # noqa: E402


def loader_samples_per_s(cfg: DiTDataConfig, steps: int, seed: int = 0) -> float:
    """Steady-state samples/s of ``DiTBatches`` with a consumer that does nothing."""
    warm = max(1, cfg.num_workers * cfg.prefetch_factor)  # batches already queued before timing starts
    it = iter(DiTBatches(cfg, seed=seed))
    for _ in range(warm):
        next(it)
    t0, n = time.perf_counter(), 0
    for batch in itertools.islice(it, steps):
        n += len(batch["keys"])
    elapsed = time.perf_counter() - t0
    it.close()
    return n / elapsed


def bench_loader(root: str | Path, bucket: str, *, batch_size: int, workers: int, steps: int,
                 demand_samples_per_s: float) -> dict[str, float]:
    """Loader capacity with ``workers`` workers and with none, against the step's demand (samples/s).

    Prints one line per figure and ``loader_ratio=Y``; returns the figures.
    """
    base = {"root": str(root), "buckets": (bucket,), "weights": (1.0,), "batch_sizes": (batch_size,)}
    inline = loader_samples_per_s(DiTDataConfig(**base, num_workers=0), steps)
    parallel = loader_samples_per_s(DiTDataConfig(**base, num_workers=workers), steps) if workers else inline
    ratio = parallel / demand_samples_per_s
    print(f"loader {bucket} batch {batch_size}: {inline:.2f} samples/s in the training process, "
          f"{parallel:.2f} samples/s with {workers} workers")
    print(f"step demand: {demand_samples_per_s:.2f} samples/s")
    print(f"loader_ratio={ratio:.2f}")
    return {"loader_samples_per_s": parallel, "inline_samples_per_s": inline, "demand_samples_per_s": demand_samples_per_s,
            "loader_ratio": ratio}


def step_demand(bucket: str, batch_size: int, dit_preset: str, vae_preset: str, steps: int = 3) -> float:
    """samples/s of VAE encode + DiT forward/backward for one batch of ``bucket`` on this machine."""
    from trainer.models.dit import DiT, dit_config
    from trainer.models.vae import CausalVAE, vae_config

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    torch.manual_seed(0)
    vae = CausalVAE(vae_config(vae_preset)).to(device).eval().requires_grad_(False)
    dcfg = dit_config(dit_preset, in_channels=vae.cfg.latent_channels)
    dit = DiT(dcfg).to(device).train()
    f, h, w = parse_bucket(bucket)
    pixels = torch.randint(0, 256, (batch_size, 3, f, h, w), dtype=torch.uint8)
    text = torch.randn(batch_size, dcfg.max_text_len, dcfg.text_dim, device=device)

    def one_step() -> None:
        with torch.no_grad(), autocast:
            mean, logvar = vae.encode_moments(pixels_to_float(pixels.to(device)))  # (B, C, t, h, w)
        z = (mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)).float().transpose(1, 2)  # (B, t, C, h, w)
        t = torch.randint(0, 1000, (batch_size,), device=device)
        with autocast:
            out = dit(z, text, t)
        torch.nn.functional.mse_loss(out.float(), torch.randn_like(z)).backward()
        dit.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    one_step()  # warm-up (allocator, kernels)
    t0 = time.perf_counter()
    for _ in range(steps):
        one_step()
    rate = batch_size * steps / (time.perf_counter() - t0)
    print(f"step: VAE {vae_preset} encode + DiT {dit_preset} forward/backward on {device}, "
          f"latent {tuple(z_shape(vae, f, h, w))}: {rate:.2f} samples/s (T5 not counted)")
    return rate


def z_shape(vae, f: int, h: int, w: int) -> tuple[int, int, int, int]:
    s, t = vae.cfg.spatial_factor, vae.cfg.temporal_factor
    return (vae.cfg.latent_channels, (f - 1) // t + 1, h // s, w // s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bucket", default="49x256x384")
    ap.add_argument("--clips", type=int, default=16)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=24, help="batches timed for the loader")
    ap.add_argument("--dit-preset", default="tiny")
    ap.add_argument("--vae-preset", default="tiny")
    ap.add_argument("--demand", type=float, default=0.0, help="step samples/s; 0 measures it here")
    args = ap.parse_args()
    torch.set_num_threads(1)  # the loader workers get the other cores

    with tempfile.TemporaryDirectory(prefix="dit_loader_") as tmp:
        t0 = time.perf_counter()
        write_synthetic_shards(tmp, {args.bucket: list(range(args.clips))}, per_shard=4)
        print(f"shards: {args.clips} synthetic clips of {args.bucket} in {time.perf_counter() - t0:.1f} s")
        demand = args.demand or step_demand(args.bucket, args.batch, args.dit_preset, args.vae_preset)
        bench_loader(tmp, args.bucket, batch_size=args.batch, workers=args.workers, steps=args.steps,
                     demand_samples_per_s=demand)


if __name__ == "__main__":
    main()
