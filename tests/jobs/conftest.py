"""A real Ray head on loopback for the `ray job submit` tests, started once per session and stopped by its own
process ids, so no other Ray cluster on the machine is touched."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1]))  # tests/procs.py, shared with test_end_to_end
from procs import descendants  # noqa: E402

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# Generous: on a loaded 2-core machine the head's dashboard agent has been seen to take over a minute to register.
READY_DEADLINE_S = 600.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_exe() -> str:
    return shutil.which("ray") or str(Path(sys.executable).with_name("ray"))


def _ray(*args: str, env: dict, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([_ray_exe(), *args], env=env, capture_output=True, text=True, timeout=timeout)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class RayHead:
    """`ray start --head --block` as a child process this fixture owns, in its own process group."""

    def __init__(self, tmp: Path) -> None:
        self.dashboard_port = _free_port()
        # Token auth, as a head started on a machine that ever ran a local ray.init() would use, with the token
        # given explicitly so no ~/.ray/auth_token is read or written; the job itself never needs to know.
        self.env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16),
                        RAY_USAGE_STATS_ENABLED="0")
        self.env.pop("RAY_ADDRESS", None)
        self.temp_dir = tmp  # Ray's socket paths must stay short
        tmp.mkdir(parents=True, exist_ok=True)
        self.log = (tmp / "head.log").open("w")  # removed with the temp dir
        self.proc = subprocess.Popen(
            [_ray_exe(), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={_free_port()}",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}", "--num-cpus=2",
             "--include-dashboard=true", f"--temp-dir={tmp}", "--disable-usage-stats",
             # Ray's fixed default ports (agent 52365, client server 10001) collide with any other Ray on the
             # machine; a head whose dashboard agent cannot bind never accepts a job ("No available agent").
             f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
             f"--runtime-env-agent-port={_free_port()}", f"--metrics-export-port={_free_port()}",
             f"--ray-client-server-port={_free_port()}"],
            env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.address = f"http://127.0.0.1:{self.dashboard_port}"

    def wait_ready(self) -> None:
        """Until the head accepts a job: the dashboard answers and its job agent has registered (a submission
        before that fails with `500: No available agent to submit job`)."""
        deadline = time.monotonic() + READY_DEADLINE_S
        last = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start --head exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                probe = self.ray("job", "submit", "--no-wait", "--", "python", "-c", "print('ready')", timeout=120)
            except subprocess.TimeoutExpired as err:
                last = f"timed out: {err}"
                continue
            if probe.returncode == 0:
                return
            last = (probe.stdout + probe.stderr)[-2000:]
            # Dashboard not listening yet, or the agent not registered yet: both clear up; anything else is real.
            if not any(s in last for s in ("No available agent", "Connection refused", "Failed to connect",
                                           "Cannot connect", "ConnectionError", "503", "502")):
                raise RuntimeError(f"the Ray head refused a probe job: {last}")
            time.sleep(1.0)  # polling interval, not a readiness assumption
        raise RuntimeError(f"the Ray head was not ready within {READY_DEADLINE_S:.0f}s; last answer: {last}\n"
                           f"{self.log_tail()}")

    def ray(self, *args: str, timeout: float) -> subprocess.CompletedProcess:
        """A `ray job ...` command against this head (``args`` start with "job" and its subcommand)."""
        return _ray(*args[:2], f"--address={self.address}", *args[2:], env=self.env, timeout=timeout)

    def submit(self, *entrypoint: str, timeout: float) -> subprocess.CompletedProcess:
        """`ray job submit --working-dir <repo> -- <entrypoint>`, then wait for the job by polling its status (not
        by tailing its log stream, which has been seen to hang on a loaded machine). stdout: the job's log and
        its final status; returncode 0 when the job succeeded."""
        sid = f"test-{secrets.token_hex(6)}"
        sub = self.ray("job", "submit", "--no-wait", f"--submission-id={sid}", "--working-dir", str(REPO),
                       "--", *entrypoint, timeout=300)
        if sub.returncode != 0:
            return sub
        deadline = time.monotonic() + timeout
        status = None
        while time.monotonic() < deadline:
            status = self.ray("job", "status", sid, timeout=120)
            # A finished job reads "Job '<id>' succeeded" / "failed" / "was stopped"; a running one "Status for ...".
            if any(f"Job '{sid}' {s}" in status.stdout + status.stderr for s in ("succeeded", "failed", "was stopped")):
                break
            time.sleep(5.0)  # polling interval: each `ray job status` is a Python process importing Ray
        else:
            self.ray("job", "stop", sid, timeout=120)
            raise TimeoutError(f"job {sid} ({' '.join(entrypoint)}) did not finish within {timeout:.0f}s")
        logs = self.ray("job", "logs", sid, timeout=120)
        done = status.stdout + status.stderr
        return subprocess.CompletedProcess(
            sub.args, 0 if f"Job '{sid}' succeeded" in done else 1,
            stdout=f"{logs.stdout}\n{done}", stderr=sub.stderr + logs.stderr)

    def log_tail(self) -> str:
        """The head's own output and the tails of the logs that say why its job agent is missing."""
        self.log.flush()
        parts = [Path(self.log.name).read_text()[-3000:]]
        for name in ("dashboard_agent.log", "raylet.out", "dashboard.log"):
            for f in sorted(self.temp_dir.glob(f"session_*/logs/{name}"))[-1:]:
                parts.append(f"--- {f}\n{f.read_text(errors='replace')[-3000:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        """SIGTERM to `ray start --block` (it stops the processes it started), then SIGKILL to whatever of its
        own descendants is left: only pids this head spawned, never anything found by name."""
        pids = descendants(self.proc.pid)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        for pid in pids | descendants(self.proc.pid):
            if _alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.log.close()


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory) -> Iterator[RayHead]:
    tmp = Path("/tmp") / f"rayt{os.getpid()}"
    head = RayHead(tmp)
    try:
        head.wait_ready()
        yield head
    finally:
        head.stop()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def submit_job(ray_head: RayHead) -> Callable[..., subprocess.CompletedProcess]:
    """A function that runs `ray job submit --working-dir <repo> -- <entrypoint>` against the session's head."""

    def submit(*entrypoint: str, timeout: float = 900) -> subprocess.CompletedProcess:
        return ray_head.submit(*entrypoint, timeout=timeout)

    return submit
