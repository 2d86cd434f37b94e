"""A real Ray head on loopback for the `ray job submit` tests."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray(*args: str, env: dict, timeout: float) -> subprocess.CompletedProcess:
    exe = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
    return subprocess.run([exe, *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def submit_job() -> Iterator[Callable[..., subprocess.CompletedProcess]]:
    """Start `ray start --head` on 127.0.0.1 (2 CPUs, dashboard on), hand back a function that runs
    `ray job submit --working-dir <repo> -- <entrypoint>` against it, and stop the head afterwards."""
    port, dash = _free_port(), _free_port()
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    tmp_ray = Path("/tmp") / f"rayt{os.getpid()}"  # Ray's socket paths must stay short
    started = _ray("start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                   "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=2",
                   "--include-dashboard=true", f"--temp-dir={tmp_ray}", "--disable-usage-stats",
                   env=env, timeout=180)
    assert started.returncode == 0, started.stderr[-3000:]

    def submit(*entrypoint: str, timeout: float = 900) -> subprocess.CompletedProcess:
        return _ray("job", "submit", f"--address=http://127.0.0.1:{dash}", "--working-dir", str(REPO),
                    "--", *entrypoint, env=env, timeout=timeout)

    try:
        yield submit
    finally:
        _ray("stop", "--force", env=env, timeout=120)
        shutil.rmtree(tmp_ray, ignore_errors=True)
