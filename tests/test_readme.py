"""The README's walkthrough, read from the README itself and run as written, in order, in a fresh folder.

The rule (README.md says it too): every fenced block whose info string is exactly ``bash walkthrough`` belongs to
the walkthrough; each non-blank line of such a block that is not a comment is one command (no continuation lines);
a trailing ``# exit N`` comment means the command is expected to end with status N (a documented refusal), otherwise
0. Each command must be ``python -m MODULE ...``; it runs with this interpreter, with the folder as its current
directory, the repository's top-level entries linked into it (so ``jobs/configs/sample/...`` resolves as in a
clone). After each command the test checks what that command promises to write (``check_outputs``).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
TAG = "bash walkthrough"


@dataclass(frozen=True)
class Command:
    line: int  # in README.md
    text: str
    argv: list[str]
    exit_status: int

    @property
    def module(self) -> str:
        return self.argv[2]

    @property
    def args(self) -> list[str]:
        return self.argv[3:]

    def flag(self, name: str, default: str | None = None) -> str | None:
        a = self.args
        return a[a.index(name) + 1] if name in a else default

    def all(self, name: str) -> list[str]:
        return [self.args[i + 1] for i, a in enumerate(self.args) if a == name]


def walkthrough(text: str) -> list[Command]:
    """The commands of the README's ``bash walkthrough`` blocks, in the order the README gives them."""
    commands: list[Command] = []
    block: str | None = None  # None outside a fence, else its info string
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if line.startswith("```"):
            block = line[3:].strip() if block is None else None
            continue
        if block != TAG or not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            raise ValueError(f"README.md:{n}: a walkthrough command continues on the next line; write it on one line")
        argv = shlex.split(line, comments=True)
        if argv[:2] != ["python", "-m"] or len(argv) < 3:
            raise ValueError(f"README.md:{n}: expected a walkthrough command of the form `python -m MODULE ...`, "
                             f"got {line!r}")
        status = re.search(r"#\s*exit (\d+)\b[^\"']*$", line)
        commands.append(Command(n, line, argv, int(status.group(1)) if status else 0))
    if block is not None:
        raise ValueError("README.md: a fenced block is not closed")
    return commands


def test_the_walkthrough_names_every_sample_config_and_only_files_that_exist() -> None:
    """Cheap guard for the slow run below: the README and jobs/configs/sample/ stay in step."""
    commands = walkthrough(README.read_text())
    modules = [c.module for c in commands]
    for needed in ("jobs.curate", "catalog", "jobs.shards", "jobs.train", "jobs.precompute", "jobs.sample",
                   "jobs.export"):
        assert needed in modules, f"the walkthrough has no `python -m {needed}` command"
    configs = {c.flag("--config") for c in commands if c.flag("--config")}
    assert all((REPO / c).is_file() for c in configs), sorted(c for c in configs if not (REPO / c).is_file())
    shipped = {str(p.relative_to(REPO)) for p in (REPO / "jobs/configs/sample").glob("*.toml")}
    assert shipped <= configs, f"sample configs the walkthrough never uses: {sorted(shipped - configs)}"
    # The first command writes what every later one reads: nothing in the walkthrough points outside out/.
    for c in commands:
        for a in c.args:
            if a.startswith(("out", "runs", "/")) and not a.startswith("out/"):
                pytest.fail(f"README.md:{c.line}: {a!r} is outside out/")


# ------------------------------------------------------------------------------------------------------------
# What each command promises to write


def _files(root: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} if root.exists() else {}


def _query(db: Path, sql: str, params: list | None = None) -> list[tuple]:
    from catalog.db import open_catalog

    con = open_catalog(db, read_only=True)
    try:
        return con.execute(sql, params or []).fetchall()
    finally:
        con.close()


def _manifest(folder: Path) -> dict:
    from catalog.shards import read_manifest

    manifest = read_manifest(folder)
    assert manifest is not None, f"{folder}: no manifest.json"
    return manifest


def _check_train(cmd: Command, cwd: Path) -> None:
    from catalog.shard_index import select_clips
    from trainer.checkpoint import checkpoint_step, latest_checkpoint

    cfg = tomllib.loads((cwd / cmd.flag("--config")).read_text())
    ckpt = latest_checkpoint(cwd / cfg["ray"]["storage_path"] / cfg["ray"]["name"])
    assert ckpt is not None and checkpoint_step(ckpt) == cfg["train"]["steps"], ckpt
    catalog = cmd.flag("--catalog") or cfg.get("selection", {}).get("catalog")
    if catalog is None:
        return
    rows = _query(cwd / catalog, "SELECT count(DISTINCT clip_id) FROM checkpoint_clips WHERE checkpoint = ?",
                  [str(ckpt)])
    assert rows[0][0] > 0, f"no checkpoint_clips rows for {ckpt} in {catalog}"
    if "selection" in cfg:
        where = cfg["selection"]["where"]
        lineage = json.loads((ckpt / "lineage.json").read_text())["selection"]
        trained = [r[0] for r in _query(cwd / catalog, "SELECT DISTINCT clip_id FROM checkpoint_clips "
                                                        "WHERE checkpoint = ? ORDER BY 1", [str(ckpt)])]
        selected = sorted(r["clip_id"] for r in select_clips(cwd / catalog, where))
        assert lineage["where"] == where and lineage["rows"] == len(selected) and trained == selected


def check_outputs(cmd: Command, cwd: Path, before: dict[Path, int], stdout: str) -> None:
    out = cwd / "out"
    if "--dry-run" in cmd.args:
        assert _files(out) == before, "a --dry-run changed files under out/"
        return
    if cmd.module == "jobs.curate":
        folder = cwd / cmd.flag("--output", "out/curate")
        for name in ("videos.parquet", "clips.parquet", "rejects.parquet", "runs.parquet", "catalog.duckdb"):
            assert (folder / name).is_file(), f"{folder / name} was not written"
    elif cmd.module == "jobs.shards":
        assert _manifest(cwd / cmd.flag("--output"))["samples"] > 0
    elif cmd.module == "jobs.train":
        _check_train(cmd, cwd)
    elif cmd.module == "jobs.precompute":
        cfg = tomllib.loads((cwd / cmd.flag("--config")).read_text()) if cmd.flag("--config") else {}
        data = cfg.get("data", {})
        latents = _manifest(cwd / cmd.flag("--output", data.get("output")))
        shards = _manifest(cwd / cmd.flag("--shards", data.get("shards")))
        assert latents["source"] == "precompute" and latents["samples"] == shards["samples"] > 0
    elif cmd.module == "jobs.sample":
        folder = cwd / cmd.flag("--output", "samples")
        assert len(list(folder.glob("*.mp4"))) == len(cmd.all("--prompt")) and list(folder.glob("*.png"))
    elif cmd.module == "jobs.export":
        assert (cwd / cmd.flag("--output") / "transformer" / "config.json").is_file()
    elif cmd.module == "catalog" and cmd.args[0] == "report":
        assert (cwd / cmd.flag("--output")).stat().st_size > 1000
    elif cmd.module == "catalog" and cmd.args[0] == "set-threshold":
        db, name, value = cmd.args[1:4]
        assert _query(cwd / db, "SELECT value FROM thresholds WHERE name = ?", [name]) == [(float(value),)]
    elif cmd.module == "catalog":
        assert len([ln for ln in stdout.splitlines() if ln.strip()]) >= 2, "a query printed no rows"
    else:
        pytest.fail(f"README.md:{cmd.line}: the walkthrough test knows no outputs of `python -m {cmd.module}`; "
                    "add them to check_outputs")


@pytest.mark.slow
def test_the_readme_walkthrough_runs_as_written(tmp_path: Path) -> None:
    commands = walkthrough(README.read_text())
    cwd = tmp_path / "clone"
    cwd.mkdir()
    for entry in REPO.iterdir():  # the clone's files, not its outputs (a clone has no out/ or runs/)
        if not entry.name.startswith(".") and entry.name not in ("out", "runs", "samples"):
            (cwd / entry.name).symlink_to(entry)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    times = []
    for cmd in commands:
        before = _files(cwd / "out")
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, *cmd.argv[1:]], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=600, check=False)
        times.append((time.monotonic() - t0, cmd.text[:90]))
        said = f"README.md:{cmd.line}: {cmd.text}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"
        assert proc.returncode == cmd.exit_status, said
        assert "Traceback" not in proc.stdout + proc.stderr, said
        if cmd.exit_status:
            assert proc.stderr.strip(), said  # a refusal says why
        else:
            check_outputs(cmd, cwd, before, proc.stdout)
    # The HQ fine-tune continues the DiT stage at the latent scale that stage measured (neither config sets one).
    from jobs.end_to_end import run_metrics

    runs = cwd / "out" / "sample" / "runs"
    assert run_metrics(runs / "dit_hq")[-1]["latent_scale"] == run_metrics(runs / "dit")[-1]["latent_scale"]
    print("\n".join(f"{s:6.1f}s  {text}" for s, text in times))
