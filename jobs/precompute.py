"""Precompute job: bucketed pixel shards in, the same buckets out with VAE posterior moments and T5 states.

    python -m jobs.precompute --shards RUN/shards --vae RUN/vae_stage2 --text-encoder google/t5-v1_1-xxl \
        --output RUN/latents [--config jobs/configs/precompute.toml]
    ray job submit --working-dir . -- python -m jobs.precompute --shards /abs/shards ... --output /abs/latents

Each input tar ``<F>x<H>x<W>/shard-NNNNNN.tar`` becomes the output tar of the same name whose samples hold
``latent.npy`` (the posterior moments: mean then log-variance channels, so the DiT keeps drawing posterior
noise), ``text.npy`` + ``text_mask.npy`` (the T5 states of the caption) and the ``txt`` and ``json`` of the
input sample; the pixels are dropped. The DiT trainer reads either kind of shard (trainer.data).

Shards are encoded on a Ray Data actor pool (``[ray] actors`` actors, each loading the VAE and T5 once, with
``cpus_per_actor`` CPUs, fractional on a laptop, and ``gpus_per_actor`` GPUs when set). A tar is written to a
temporary name and renamed once complete; re-running skips every complete tar, so a killed run resumes,
and a different VAE, text encoder or input in the same output is refused unless ``--overwrite``.
Exit status: 0 done, 1 a shard failed, 2 bad arguments or config (one line on stderr).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from catalog.config import from_dict, load_toml
from catalog.shards import (
    CAPTION_KEY,
    META_KEY,
    Bucket,
    BucketTarWriter,
    ShardInfo,
    make_manifest,
    parse_bucket,
    read_manifest,
    write_manifest,
)
from jobs import _cli
from trainer.text import TextConfig

STATE_DIR = ".precompute"
"""Hidden folder in the output: the config identity and one result file per finished tar."""


@dataclass(frozen=True, kw_only=True, slots=True)
class DataSection:
    """``[data]``: where the pixel shards are and where the precomputed ones go."""

    shards: str = ""
    """Input: a shard folder written by jobs.shards (``manifest.json`` + ``<F>x<H>x<W>/shard-NNNNNN.tar``)."""
    output: str = ""
    """Output folder: the same layout, precomputed members."""
    buckets: tuple[str, ...] = ()
    """Buckets to precompute; empty = every bucket of the input manifest."""
    batch_size: int = 4
    """Samples encoded together (one bucket per batch: equal shapes)."""

    def __post_init__(self) -> None:
        for b in self.buckets:
            parse_bucket(b)
        if self.batch_size < 1:
            raise ValueError(f"[data] batch_size: expected >= 1, got {self.batch_size}")


@dataclass(frozen=True, kw_only=True, slots=True)
class VAESection:
    checkpoint: str = ""
    """A VAE stage's run folder (its latest checkpoint) or checkpoint folder."""
    weights: str = "ema"
    """"ema" or "model"."""

    def __post_init__(self) -> None:
        if self.weights not in ("ema", "model"):
            raise ValueError(f"[vae] weights: expected 'ema' or 'model', got {self.weights!r}")


@dataclass(frozen=True, kw_only=True, slots=True)
class StandinSection:
    text: bool = False
    """Build the tiny random stand-in T5 (trainer.standins) in the folder [text] model names when it does
    not exist yet; named a stand-in in the output manifest."""


@dataclass(frozen=True, kw_only=True, slots=True)
class RaySection:
    actors: int = 1
    """Encoder actors (each holds one VAE and one T5)."""
    cpus_per_actor: float = 0.5
    """CPUs each actor reserves: fractional on small machines, so the read task is never starved."""
    gpus_per_actor: float = 0.0
    """GPUs each actor reserves; > 0 encodes on CUDA."""
    threads_per_actor: int = 1
    """torch threads inside an actor."""

    def __post_init__(self) -> None:
        if self.actors < 1 or self.cpus_per_actor <= 0 or self.gpus_per_actor < 0 or self.threads_per_actor < 1:
            raise ValueError(f"[ray]: expected actors >= 1, cpus_per_actor > 0, gpus_per_actor >= 0 and "
                             f"threads_per_actor >= 1, got {self.actors}, {self.cpus_per_actor}, "
                             f"{self.gpus_per_actor}, {self.threads_per_actor}")


@dataclass(frozen=True, kw_only=True, slots=True)
class PrecomputeConfig:
    data: DataSection = DataSection()
    vae: VAESection = VAESection()
    text: TextConfig = TextConfig()
    standins: StandinSection = StandinSection()
    ray: RaySection = RaySection()


def config_from_dict(data: dict[str, Any]) -> PrecomputeConfig:
    """The job config from a parsed TOML (or the ``[precompute]`` table of jobs/configs/end_to_end.toml)."""
    return from_dict(PrecomputeConfig, dict(data), where="precompute")


# ---------------------------------------------------------------------------------------------------------
# Identity of a precompute output: same input, VAE and text encoder -> the same tars.


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _folder_fingerprint(folder: Path) -> list[tuple[str, int, int]]:
    return sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in folder.rglob("*") if p.is_file())


def precompute_hash(cfg: PrecomputeConfig, vae_folder: Path, input_manifest_sha: str) -> str:
    """What the tars depend on: the input manifest, the VAE checkpoint's files and weights, the text config."""
    parts = {"input": input_manifest_sha, "vae": [str(vae_folder), cfg.vae.weights, _folder_fingerprint(vae_folder)],
             "text": dataclasses.asdict(cfg.text), "standin_text": cfg.standins.text}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------
# The actor: one VAE + one T5, a whole input tar per call.


class ShardEncoder:
    """Ray Data callable class: rows ``{"shard": "<bucket>/shard-NNNNNN.tar"}`` in, one result row per tar out."""

    def __init__(self, config: dict[str, Any], vae_folder: str) -> None:
        import torch

        from trainer.sampling import load_vae
        from trainer.text import TextEncoder

        self.cfg = config_from_dict(config)
        torch.set_num_threads(self.cfg.ray.threads_per_actor)
        self.device = torch.device("cuda" if self.cfg.ray.gpus_per_actor > 0 and torch.cuda.is_available() else "cpu")
        self.vae, _ = load_vae(vae_folder, self.cfg.vae.weights, self.device)
        self.text = TextEncoder(self.cfg.text, self.device)
        self.src, self.out = Path(self.cfg.data.shards), Path(self.cfg.data.output)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        results = [encode_shard(str(rel), self.src, self.out, self.vae, self.text, self.cfg.data.batch_size)
                   for rel in batch["shard"]]
        return {k: [r[k] for r in results] for k in ("shard", "samples", "bytes", "sha256", "errors", "seconds")}


def _read_samples(url: str):
    import webdataset as wds

    return wds.DataPipeline(wds.SimpleShardList([url]), wds.tarfile_to_samples(handler=wds.reraise_exception))


def encode_shard(rel: str, src: Path, out: Path, vae: Any, text: Any, batch_size: int) -> dict[str, Any]:
    """Encode the input tar ``src/rel`` into ``out/rel`` (atomically) and record its result; returns it.

    A sample whose pixels do not decode to the bucket's shape, or that has no caption, is left out and
    named in ``errors``; the tar holds the others.
    """
    import torch

    from trainer.data import decode_sample, encode_precomputed

    t0 = time.perf_counter()
    bucket = rel.split("/")[0]
    staging = out / STATE_DIR / "staging" / rel.replace("/", "_")
    shutil.rmtree(staging, ignore_errors=True)  # a killed attempt's leftovers
    writer = BucketTarWriter(staging, bucket, maxcount=2**62, maxsize=2**62)  # one output tar per input tar
    errors: list[dict[str, str]] = []
    pending: list[tuple[str, torch.Tensor, str, bytes]] = []

    def flush() -> None:
        x = torch.stack([p[1] for p in pending]).to(vae_device(vae))  # (B, 3, F, H, W) in [-1, 1]
        with torch.no_grad():
            mean, logvar = vae.encode_moments(x)  # (B, C, t, h, w) each
            emb, mask = text.encode([p[2] for p in pending])  # (B, L, D), (B, L)
        for i, (key, _, caption, meta) in enumerate(pending):
            files = {CAPTION_KEY: caption.encode(), META_KEY: meta}
            writer.write(key, files | encode_precomputed(mean[i], logvar[i], emb[i].float(), mask[i]))
        pending.clear()

    try:
        for sample in _read_samples(str(src / rel)):
            key = str(sample["__key__"])
            try:
                caption = (sample.get(CAPTION_KEY) or b"").decode("utf-8").strip()
                if not caption:
                    raise ValueError("no caption (the 'txt' member is missing or empty)")
                x = decode_sample(sample, bucket)  # (3, F, H, W), shape checked against the bucket
            except (ValueError, KeyError, OSError) as err:
                errors.append({"key": key, "error": f"{type(err).__name__}: {err}"})
                continue
            pending.append((key, x, caption, sample[META_KEY]))
            if len(pending) == batch_size:
                flush()
        if pending:
            flush()
        done = writer.close()
    except BaseException:
        writer.abort()
        raise
    result = {"shard": rel, "samples": sum(d.samples for d in done), "bytes": 0, "sha256": "",
              "errors": json.dumps(errors), "seconds": time.perf_counter() - t0}
    final = out / rel
    final.parent.mkdir(parents=True, exist_ok=True)
    if done:
        result["bytes"], result["sha256"] = done[0].bytes, done[0].sha256
    # The result file first, then the tar's final name: a tar under its final name always has its result.
    _write_json(out / STATE_DIR / "done" / f"{rel.replace('/', '_')}.json", result)
    if done:
        os.replace(staging / done[0].shard, final)
    shutil.rmtree(staging, ignore_errors=True)
    return result


def vae_device(vae: Any) -> Any:
    return next(vae.parameters()).device


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def finished(out: Path, rel: str) -> dict[str, Any] | None:
    """The result of a tar a previous attempt completed, or None."""
    marker = out / STATE_DIR / "done" / f"{rel.replace('/', '_')}.json"
    if not marker.is_file():
        return None
    result = json.loads(marker.read_text())
    if result["samples"] and not (out / rel).is_file():
        return None  # killed between the result file and the rename
    return result


# ---------------------------------------------------------------------------------------------------------
# The run


@dataclass
class PrecomputeResult:
    output: Path
    manifest: dict[str, Any]
    encoded: int  # tars encoded by this run
    reused: int  # complete tars found from an earlier attempt
    seconds: float
    samples_per_second: float  # of the tars this run encoded


class OutputConflictError(ValueError):
    """The output folder holds precomputed shards of another input, VAE or text encoder."""


def run_precompute(cfg: PrecomputeConfig, *, overwrite: bool = False,
                   progress: Any = None) -> PrecomputeResult:
    """Precompute every tar of ``cfg.data.shards`` into ``cfg.data.output``; Ray must be initialised."""
    import ray
    from ray.data import ActorPoolStrategy

    from trainer.checkpoint import latest_checkpoint
    from trainer.standins import build_t5_standin, standin_description

    t0 = time.perf_counter()
    src, out = Path(cfg.data.shards).resolve(), Path(cfg.data.output).resolve()
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, shards=str(src), output=str(out)))
    manifest_in = read_manifest(src)
    if manifest_in is None:
        raise FileNotFoundError(f"[data] shards {src}: expected a shard folder with manifest.json (jobs.shards writes one)")
    if not cfg.vae.checkpoint:
        raise ValueError("[vae] checkpoint: expected a VAE stage's run or checkpoint folder, got an empty string")
    vae_folder = latest_checkpoint(cfg.vae.checkpoint)  # checked here: a wrong path fails before any actor starts
    if vae_folder is None:
        raise FileNotFoundError(f"[vae] checkpoint: expected a VAE checkpoint at or under {cfg.vae.checkpoint}, found none")
    if cfg.standins.text and not Path(cfg.text.model).is_dir():
        build_t5_standin(cfg.text.model)
    input_sha = file_sha256(src / "manifest.json")
    identity = precompute_hash(cfg, Path(vae_folder), input_sha)

    state = out / STATE_DIR / "config.json"
    if state.is_file() and json.loads(state.read_text()).get("hash") != identity:
        if not overwrite:
            raise OutputConflictError(
                f"output {out} holds precomputed shards of another input, VAE or text encoder "
                f"({json.loads(state.read_text()).get('describe')}); use --overwrite to replace them")
        for p in out.iterdir():
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    describe = {"shards": str(src), "vae": str(vae_folder), "text": cfg.text.model}
    _write_json(state, {"hash": identity, "describe": describe})

    buckets = cfg.data.buckets or tuple(sorted(manifest_in["buckets"]))
    missing = [b for b in buckets if b not in manifest_in["buckets"]]
    if missing:
        raise ValueError(f"[data] buckets {missing}: not in {src}/manifest.json, which has {sorted(manifest_in['buckets'])}")
    shards = [s["shard"] for b in buckets for s in manifest_in["buckets"][b]["shards"]]
    results = {rel: r for rel in shards if (r := finished(out, rel)) is not None}
    todo = [rel for rel in shards if rel not in results]
    encoded_samples, encode_seconds = 0, 0.0
    t_encode = time.perf_counter()
    if todo:
        ds = ray.data.from_items([{"shard": rel} for rel in todo], override_num_blocks=len(todo))
        ds = ds.map_batches(
            ShardEncoder, batch_size=1, compute=ActorPoolStrategy(size=min(cfg.ray.actors, len(todo))),
            fn_constructor_kwargs={"config": dataclasses.asdict(cfg), "vae_folder": str(vae_folder)},
            num_cpus=cfg.ray.cpus_per_actor, num_gpus=cfg.ray.gpus_per_actor or None,
        )
        for row in ds.iter_rows():
            result = {k: row[k] for k in ("shard", "samples", "bytes", "sha256", "errors", "seconds")}
            result["samples"], result["bytes"] = int(result["samples"]), int(result["bytes"])
            results[result["shard"]] = result
            encoded_samples += result["samples"]
            if progress is not None:
                progress(result, len(results), len(shards))
        encode_seconds = time.perf_counter() - t_encode

    infos, errors = [], []
    for rel in shards:
        r = results[rel]
        errors += [{"shard": rel} | e for e in json.loads(r["errors"])]
        if r["samples"]:
            # A result file of an older attempt has no sha256: hash the tar it left.
            sha = r.get("sha256") or file_sha256(out / rel)
            infos.append(ShardInfo(rel, rel.split("/")[0], r["samples"], r["bytes"], sha))
    shapes = {b: Bucket(*parse_bucket(b), float(manifest_in["buckets"][b]["fps"])) for b in buckets}
    latent_scale_file = Path(vae_folder) / "latent_scale.json"
    standin = standin_description(cfg.text.model) if Path(cfg.text.model).is_dir() else None
    manifest = make_manifest(
        infos, shapes, source="precompute", precompute_hash=identity, input=str(src), input_manifest_sha256=input_sha,
        where=manifest_in.get("where"), selection_hash=manifest_in.get("selection_hash"),
        vae={"checkpoint": str(vae_folder), "weights": cfg.vae.weights},
        text={"model": cfg.text.model, "max_length": cfg.text.max_length, "standin": standin},
        latent_scale=json.loads(latent_scale_file.read_text())["latent_scale"] if latent_scale_file.is_file() else None,
        members=["latent.npy", "text.npy", "text_mask.npy", "txt", "json"], errors=errors,
    )
    write_manifest(out, manifest)
    return PrecomputeResult(out, manifest, len(todo), len(shards) - len(todo), time.perf_counter() - t0,
                            encoded_samples / encode_seconds if encode_seconds else 0.0)


# ---------------------------------------------------------------------------------------------------------
# Command line


def _parser() -> _cli.ArgumentParser:
    ap = _cli.ArgumentParser(prog="python -m jobs.precompute", description=__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="TOML with [data], [vae], [text], [standins], [ray]")
    ap.add_argument("--shards", help="input shard folder (overrides [data] shards)")
    ap.add_argument("--vae", help="VAE run or checkpoint folder (overrides [vae] checkpoint)")
    ap.add_argument("--text-encoder", help="T5 hub id in the local cache, or a folder (overrides [text] model)")
    ap.add_argument("--output", help="output folder (overrides [data] output)")
    ap.add_argument("--overwrite", action="store_true", help="replace precomputed shards of another input or model")
    ap.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else an in-process cluster)")
    return ap


def load_config(path: str | None, args: argparse.Namespace) -> PrecomputeConfig:
    data = load_toml(path) if path else {}
    data = {k: dict(v) for k, v in data.items()}
    for section, key, value in (("data", "shards", args.shards), ("data", "output", args.output),
                                ("vae", "checkpoint", args.vae), ("text", "model", args.text_encoder)):
        if value:
            data.setdefault(section, {})[key] = value
    return config_from_dict(data)


@_cli.entry
def main(argv: list[str] | None = None) -> int:
    t0 = time.time()
    args = _parser().parse_args(argv)
    cfg = _cli.load_config(load_config, args.config, args)
    for name, value in (("--shards", cfg.data.shards), ("--output", cfg.data.output), ("--vae", cfg.vae.checkpoint)):
        if not value:
            raise _cli.UsageError(f"{name}: expected a folder (or the [{'vae' if name == '--vae' else 'data'}] "
                                  "key in --config), got none")
    _cli.refuse_relative_paths({"--shards": cfg.data.shards, "--output": cfg.data.output, "--vae": cfg.vae.checkpoint})
    if read_manifest(cfg.data.shards) is None:
        raise _cli.UsageError(f"--shards {cfg.data.shards}: expected a shard folder with manifest.json")

    def show(result: dict[str, Any], done: int, total: int) -> None:
        n_err = len(json.loads(result["errors"]))
        print(f"precompute: {done}/{total} {result['shard']}: {result['samples']} samples"
              f"{f', {n_err} bad' if n_err else ''} in {result['seconds']:.1f}s", flush=True)

    out = Path(cfg.data.output).expanduser().resolve()
    session = _cli.start_ray(_cli.ray_address(args.address), out)
    print(f"{session.describe()}; {cfg.ray.actors} encoder actor(s) x ({cfg.ray.cpus_per_actor:g} CPU, "
          f"{cfg.ray.gpus_per_actor:g} GPU)", flush=True)
    try:
        result = run_precompute(cfg, overwrite=args.overwrite, progress=show)
    except OutputConflictError as err:
        raise _cli.UsageError(str(err)) from None
    finally:
        session.close()
    m = result.manifest
    _cli.summary_table("precompute done", [
        ("input", f"{cfg.data.shards}"),
        ("tars", f"{m['shards']} ({result.encoded} encoded, {result.reused} complete from an earlier run)"),
        ("samples", f"{m['samples']} in {len(m['buckets'])} buckets, {len(m['errors'])} bad"),
        ("rate", f"{result.samples_per_second:.2f} samples/s" if result.encoded else "nothing to encode"),
        ("text encoder", m["text"]["standin"] or m["text"]["model"]),
        ("outputs", f"{out}/<FxHxW>/shard-NNNNNN.tar, {out}/manifest.json"),
        ("wall time", f"{time.time() - t0:.1f}s"),
    ])
    return 0


if __name__ == "__main__":
    # Run the importable module's main, not this __main__ copy's: Ray pickles classes of __main__ by value, and
    # the actors' copy of ShardEncoder and the config dataclasses then cannot resolve their (string) annotations
    # ("NameError: name 'DataSection' is not defined" in every actor under `python -m jobs.precompute`).
    from jobs.precompute import main as _main

    sys.exit(_main())
