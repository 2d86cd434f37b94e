"""python -m jobs.train: shipped configs parse; a 2-worker TorchTrainer on CPU runs stage 1 then stage 2."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from jobs.train import main as train_job
from jobs.train import load_stage, parse_args, resolve
from trainer.checkpoint import checkpoint_step, latest_checkpoint, load_checkpoint
from trainer.config import load_stage_config
from trainer.synthetic import write_synthetic_shards

REPO = Path(__file__).resolve().parents[2]


def test_shipped_stage_configs_follow_the_recipe() -> None:
    s1 = load_stage_config(REPO / "jobs/configs/vae_stage1.toml")
    s2 = load_stage_config(REPO / "jobs/configs/vae_stage2.toml")
    assert s1.model.preset == s2.model.preset == "cogvideox"
    assert set(s1.data.buckets) == {"17x256x256", "1x256x256"}  # clips with images mixed in
    assert s2.data.buckets == ("161x256x256",)
    assert Path(s2.train.init_from).name == s1.ray.name  # stage 2 starts from stage 1's run
    assert s2.model.checkpointing == "chunk" and s2.model.chunk_latent_frames > 0
    assert s1.loss.kl_weight == pytest.approx(1e-6)


def test_overrides_and_relative_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    args = parse_args(["--config", str(REPO / "jobs/configs/vae_stage2.toml"), "--workers", "8", "--gpus-per-worker", "1"])
    cfg = resolve(load_stage_config(args.config), args)
    assert (cfg.ray.workers, cfg.ray.gpus_per_worker) == (8, 1.0)
    assert cfg.train.init_from == str(tmp_path / "runs/vae_stage1")
    assert cfg.data.root == str(tmp_path / "out/shards")


def test_stage_kind_picks_the_trainer(tmp_path: Path) -> None:
    assert load_stage(REPO / "jobs/configs/vae_stage1.toml").stage.kind == "vae"  # no [stage]: a VAE stage
    cfg = tmp_path / "stage.toml"
    cfg.write_text('[stage]\nkind = "vae"\n[train]\nsteps = 3\n')
    assert load_stage(cfg).train.steps == 3
    distill = load_stage(REPO / "jobs/configs/dit_distill.toml")  # trainer.distill's stage: 20 -> 10 -> 5 steps
    assert distill.stage.kind == "dit_distill" and distill.progressive.student_steps == 5
    cfg.write_text('[stage]\nkind = "gan"\n')
    with pytest.raises(ValueError, match=r"\[stage\] kind: expected one of \['dit', 'dit_distill', 'vae'\], got 'gan'"):
        load_stage(cfg)


STAGE = """
[model]
preset = "tiny"
chunk_latent_frames = {chunk}
checkpointing = "{ckpt}"
[data]
root = "{root}/train"
buckets = {buckets}
weights = {weights}
batch_sizes = {batch_sizes}
heldout_root = "{root}/heldout"
heldout_bucket = "{heldout}"
heldout_samples = 2
[optim]
lr = 1e-3
[loss]
disc_start = {disc_start}
disc_channels = 8
disc_layers = 2
disc_frames = 5
[train]
steps = {steps}
log_every = 1
eval_every = {steps}
ckpt_every = {steps}
recon_every = {steps}
init_from = "{init_from}"
[ray]
workers = 2
cpus_per_worker = 1
storage_path = "{runs}"
name = "{name}"
"""


@pytest.mark.slow
def test_two_workers_run_stage1_then_stage2_from_tars(tmp_path: Path) -> None:
    import ray

    os.environ["RAY_AUTH_MODE"] = "disabled"
    root = tmp_path / "shards"
    write_synthetic_shards(root / "train", {"17x32x32": list(range(4)), "1x32x32": list(range(100, 108)),
                                            "161x16x16": list(range(200, 202))}, per_shard=2)
    write_synthetic_shards(root / "heldout", {"17x32x32": [900, 901], "161x16x16": [950, 951]})
    runs = tmp_path / "runs"
    s1 = tmp_path / "stage1.toml"
    s1.write_text(STAGE.format(chunk=2, ckpt="block", root=root, buckets='["17x32x32", "1x32x32"]',
                               weights="[0.5, 0.5]", batch_sizes="[1, 2]", heldout="17x32x32", disc_start=2,
                               steps=2, init_from="", runs=runs, name="vae_stage1"))
    s2 = tmp_path / "stage2.toml"
    s2.write_text(STAGE.format(chunk=2, ckpt="chunk", root=root, buckets='["161x16x16"]', weights="[1.0]",
                               batch_sizes="[1]", heldout="161x16x16", disc_start=0, steps=1,
                               init_from=runs / "vae_stage1", runs=runs, name="vae_stage2"))
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        assert train_job(["--config", str(s1)]) == 0
        stage1 = latest_checkpoint(runs / "vae_stage1")
        assert stage1 is not None and checkpoint_step(stage1) == 2
        # Both workers' RNG states were merged into the one checkpoint folder.
        assert {p.name for p in stage1.glob("rng_rank*.pt")} == {"rng_rank0.pt", "rng_rank1.pt"}
        assert len(list(stage1.glob("recon_step000002_*.mp4"))) == 1  # rank 0's share of 2 held-out clips

        assert train_job(["--config", str(s2)]) == 0
        stage2 = latest_checkpoint(runs / "vae_stage2")
        assert stage2 is not None and checkpoint_step(stage2) == 1
        state, _ = load_checkpoint(stage2, rank=0)
        assert state["data_position"] == {"161x16x16": 1}
        assert state["config"]["train"]["init_from"] == str(runs / "vae_stage1")

        # Re-running stage 1 with more steps resumes at step 3 instead of starting over.
        assert train_job(["--config", str(s1), "--steps", "3"]) == 0
        resumed = latest_checkpoint(runs / "vae_stage1")
        assert checkpoint_step(resumed) == 3
        state, _ = load_checkpoint(resumed, rank=0)
        assert sum(state["data_position"].values()) == 3
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_fsdp_strategy_trains_and_saves_full_weights(tmp_path: Path) -> None:
    import ray

    from trainer.models.vae import CausalVAE, vae_config

    os.environ["RAY_AUTH_MODE"] = "disabled"
    root = tmp_path / "shards"
    write_synthetic_shards(root / "train", {"17x32x32": list(range(4))}, per_shard=2)
    write_synthetic_shards(root / "heldout", {"17x32x32": [900, 901]})
    runs = tmp_path / "runs"
    cfg = tmp_path / "fsdp.toml"
    cfg.write_text(STAGE.format(chunk=2, ckpt="block", root=root, buckets='["17x32x32"]', weights="[1.0]",
                                batch_sizes="[1]", heldout="17x32x32", disc_start=1, steps=2, init_from="",
                                runs=runs, name="fsdp").replace("[train]\n", '[train]\nstrategy = "fsdp"\n'))
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        assert train_job(["--config", str(cfg)]) == 0
    finally:
        ray.shutdown()
    state, _ = load_checkpoint(latest_checkpoint(runs / "fsdp"), rank=0)
    # Sharded parameters were gathered into full tensors: the weights load into a plain model.
    model = CausalVAE(vae_config("tiny"))
    model.load_state_dict(state["model"])
    model.load_state_dict(state["ema"])


@pytest.mark.slow
def test_a_failed_run_is_one_line_naming_the_cause_and_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A killed shard job's folder (tars, no manifest): the worker refuses it and the job says why in one line."""
    import ray

    os.environ["RAY_AUTH_MODE"] = "disabled"
    root = tmp_path / "shards"
    write_synthetic_shards(root / "train", {"17x32x32": list(range(2))}, per_shard=1)
    write_synthetic_shards(root / "heldout", {"17x32x32": [900]})
    (root / "train" / "manifest.json").unlink()
    cfg = tmp_path / "killed.toml"
    cfg.write_text(STAGE.format(chunk=2, ckpt="block", root=root, buckets='["17x32x32"]', weights="[1.0]",
                                batch_sizes="[1]", heldout="17x32x32", disc_start=1, steps=1, init_from="",
                                runs=tmp_path / "runs", name="killed").replace("workers = 2", "workers = 1"))
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        assert train_job(["--config", str(cfg)]) == 1
    finally:
        ray.shutdown()
    failed = [line for line in capsys.readouterr().err.splitlines() if "training failed" in line]
    assert len(failed) == 1, failed
    assert failed[0].startswith("training failed: rank 0: IncompleteShardsError: shard folder ")
    assert "manifest.json is missing: the shard job did not finish" in failed[0] and "allow_partial" in failed[0]


def test_catalog_flag_records_a_stage_checkpoints_lineage(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`jobs.train --catalog DB` on a stage without [selection]: the checkpoint and exactly the clips of its
    [data] root shards in its buckets land in checkpoints / checkpoint_clips (what the training run records
    after fit(), here called on a checkpoint folder; the walkthrough test runs the whole command). A missing
    catalog or a root without a manifest is refused before any training."""
    import json
    import sys

    from catalog.db import open_catalog, register_run
    from catalog.shard_index import select_clips
    from jobs.train import record_lineage
    from pipeline.shards import ShardConfig, build_shards

    sys.path.insert(0, str(REPO / "tests"))
    from shard_fixtures import SMALL_BUCKETS, make_library, write_run

    videos, clips = make_library(tmp_path / "raw")
    db = tmp_path / "catalog.duckdb"
    register_run(db, write_run(tmp_path / "run", videos, clips))
    shards = tmp_path / "shards"
    build_shards(select_clips(db, "true"), shards, where="true", buckets=SMALL_BUCKETS,
                 shards=ShardConfig(preset="ultrafast", maxcount=2))
    built = json.loads((shards / "manifest.json").read_text())["buckets"]
    video_buckets = sorted(b for b in built if not b.startswith("1x"))
    assert video_buckets and len(video_buckets) < len(built), "the fixture's shards hold no video bucket"
    stage = tmp_path / "stage.toml"
    stage.write_text(STAGE.format(chunk=0, ckpt="none", root=shards, buckets=str(video_buckets).replace("'", '"'),
                                  weights=[1.0] * len(video_buckets), batch_sizes=[1] * len(video_buckets),
                                  heldout=video_buckets[0], disc_start=1, steps=3, init_from="",
                                  runs=tmp_path / "runs", name="vae_small")
                     .replace(f'heldout_root = "{shards}/heldout"\n', "").replace(f"{shards}/train", str(shards)))
    cfg = resolve(load_stage(stage), parse_args(["--config", str(stage)]))
    ckpt = tmp_path / "runs" / "vae_small" / "checkpoint_000003"
    ckpt.mkdir(parents=True)
    n = record_lineage(db, ckpt, cfg, {"step": 3, "loss": 0.25, "nested": {"dropped": 1}})

    con = open_catalog(db, read_only=True)
    try:
        row = con.execute("SELECT run, stage, kind, step, buckets, metrics FROM checkpoints WHERE checkpoint = ?",
                          [str(ckpt)]).fetchall()
        trained = con.execute("SELECT clip_id, bucket FROM checkpoint_clips WHERE checkpoint = ? ORDER BY ALL",
                              [str(ckpt)]).fetchall()
        want = con.execute("SELECT clip_id, bucket FROM shard_samples WHERE output = ? AND NOT starts_with(bucket, "
                           "'1x') ORDER BY ALL", [str(shards)]).fetchall()
        images = con.execute("SELECT count(*) FROM shard_samples WHERE output = ? AND starts_with(bucket, '1x')",
                             [str(shards)]).fetchone()[0]
    finally:
        con.close()
    assert row == [("vae_small", "vae_small", "vae", 3, sorted(video_buckets), '{"loss": 0.25, "step": 3}')]
    assert trained == want and n == len({c for c, _ in want}) > 0
    assert images > 0  # the image bucket was in the shards but not in the stage's buckets: not recorded

    assert train_job(["--config", str(stage), "--catalog", str(tmp_path / "absent.duckdb")]) == 2
    assert "--catalog" in capsys.readouterr().err and not (tmp_path / "absent.duckdb").exists()
    (shards / "manifest.json").unlink()
    assert train_job(["--config", str(stage), "--catalog", str(db)]) == 2
    assert "expected a shard folder with manifest.json" in capsys.readouterr().err
