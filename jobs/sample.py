"""Sample videos from a trained DiT checkpoint: prompt -> T5 -> DDIM + CFG (EMA weights) -> VAE -> mp4.

    python -m jobs.sample --checkpoint RUN/checkpoint_NNNNNN --prompt "a red car drives through snow" --frames 49
    python -m jobs.sample --checkpoint RUN --prompt "..." --prompt "..." --steps 50 --guidance 6 --output OUT

``--checkpoint`` is a DiT stage checkpoint or run folder (its latest checkpoint). The frozen VAE and text
encoder are the ones the checkpoint records. Writes ``OUT/sample_step{N}_{i}.mp4`` per prompt, a contact
sheet ``OUT/samples_step{N}.png`` and ``OUT/samples_step{N}.json``; prints the paths.
Exit status: 0 done, 2 bad arguments (one line on stderr).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from jobs import _cli


def parse_args(argv: list[str] | None):
    p = _cli.ArgumentParser(prog="python -m jobs.sample", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="DiT checkpoint folder, or a run folder (its latest)")
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    p.add_argument("--frames", type=int, default=49, help="pixel frames, 4k+1 (1 = an image); default 49")
    p.add_argument("--height", type=int, default=0, help="pixels, a multiple of 16 (default: the stage's sample size)")
    p.add_argument("--width", type=int, default=0, help="pixels, a multiple of 16 (default: the stage's sample size)")
    p.add_argument("--steps", type=int, default=None,
                   help="DDIM steps (default 50; a distilled student's checkpoint: the steps it was distilled to)")
    p.add_argument("--guidance", type=float, default=6.0, help="classifier-free guidance scale (default 6; 1 = off)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.add_argument("--fps", type=int, default=0, help="frame rate of the mp4 and, for a model with fps_conditioning, "
                   "the rate asked for (default: the stage's [sample] fps)")
    p.add_argument("--schedule", choices=("constant", "dynamic_cosine", "oscillating"), default=None,
                   help="guidance weight schedule (default: the stage's [sample] guidance)")
    p.add_argument("--motion-guidance", type=float, default=None,
                   help="GenTron's lambda_M for a model trained with p_motion_free (0 = off; default: the stage's)")
    p.add_argument("--dynamic-threshold", type=float, default=None,
                   help="percentile of dynamic thresholding of x0, e.g. 0.95 (0 = off; default: the stage's)")
    p.add_argument("--weights", choices=("ema", "model"), default="ema", help="which weights (default ema)")
    p.add_argument("--output", default="samples", help="output folder (default ./samples)")
    p.add_argument("--device", default="", help="torch device (default: cuda if available, else cpu)")
    args = p.parse_args(argv)
    if args.frames < 1 or (args.frames - 1) % 4:
        p.error(f"--frames: expected 4k+1 (1, 9, 17, 49, ...), got {args.frames}")
    for name in ("height", "width"):
        if getattr(args, name) < 0 or getattr(args, name) % 16:
            p.error(f"--{name}: expected a multiple of 16, got {getattr(args, name)}")
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps: expected >= 1, got {args.steps}")
    if args.fps < 0:
        p.error(f"--fps: expected >= 1 (or 0 for the stage's), got {args.fps}")
    if not Path(args.checkpoint).exists():
        p.error(f"--checkpoint {args.checkpoint}: no such folder")
    return args


@_cli.entry
def main(argv: list[str] | None = None) -> int:
    t0 = time.time()
    args = parse_args(argv)
    import dataclasses

    import torch

    from catalog.config import from_dict
    from trainer.runtime import default_device, load_init
    from trainer.sampling import Sampler, write_samples
    from trainer.train_dit import DiTStageConfig

    try:
        folder, state = load_init(args.checkpoint)
        stage = from_dict(DiTStageConfig, dict(state["config"]), where="checkpoint config")
        overrides = {"guidance_scale": args.guidance, "guidance": args.schedule,
                     "motion_guidance": args.motion_guidance, "dynamic_threshold": args.dynamic_threshold,
                     "fps": args.fps or None}
        sample_cfg = dataclasses.replace(stage.sample, **{k: v for k, v in overrides.items() if v is not None})
    except (FileNotFoundError, KeyError, ValueError) as err:
        raise _cli.UsageError(f"--checkpoint {args.checkpoint}: expected a DiT stage checkpoint: {err}") from None
    if args.steps is None:  # a student of trainer/distill.py samples at the steps it was distilled to
        args.steps = int(state["distill"]["sampling_steps"]) if "distill" in state else 50
    _, height, width = stage.sample_shape()
    height, width = args.height or height, args.width or width
    device = torch.device(args.device) if args.device else default_device()
    sampler = Sampler.from_checkpoint(folder, device=device, weights=args.weights)
    try:
        videos = sampler.generate(args.prompt, frames=args.frames, height=height, width=width, steps=args.steps,
                                  guidance_scale=args.guidance, seed=args.seed, guidance=sample_cfg.guidance_config(),
                                  fps=sample_cfg.fps)
    except ValueError as err:  # a size the VAE and patches cannot take
        raise _cli.UsageError(str(err)) from None
    paths = write_samples(args.output, int(state["step"]), videos, args.prompt, fps=sample_cfg.fps, info={
        "checkpoint": str(folder), "steps": args.steps, "guidance_scale": args.guidance, "seed": args.seed,
        "guidance": sample_cfg.guidance, "motion_guidance": sample_cfg.motion_guidance,
        "dynamic_threshold": sample_cfg.dynamic_threshold, "fps": sample_cfg.fps,
        "weights": args.weights, "text_encoder": sampler.encoder.describe()})
    _cli.summary_table(f"sampled {folder}", [
        ("prompts", len(args.prompt)), ("shape", f"{args.frames}x{height}x{width}"),
        ("text encoder", sampler.encoder.describe()), ("files", "\n".join(str(p) for p in paths)),
        ("wall time", f"{time.time() - t0:.1f}s"),
    ])
    return 0


if __name__ == "__main__":
    sys.exit(main())
