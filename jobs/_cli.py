"""What every ``python -m jobs.*`` does alike at the console.

- **Bad arguments or config**: one line on stderr and exit status 2, never a traceback. Parsers are
  :class:`ArgumentParser`; config loading goes through :func:`load_config`; anything else a job finds wrong with
  what it was given raises :class:`UsageError`. :func:`entry` turns those into the line and the status.
- **Ray start-up**: :func:`ray_address` — ``--address`` if given, else the config's address, else ``RAY_ADDRESS``
  (which Ray sets for the driver under ``ray job submit``), else ``"local"``: an in-process cluster (never
  ``"auto"``, so a stale cluster file from an earlier ``ray start`` cannot capture the run). The job never reads
  ``RAY_AUTH_MODE``: under ``ray job submit`` the driver inherits the head's mode.
- **Paths under ``ray job submit``**: the driver runs inside Ray's temporary working directory, which Ray deletes
  later, so :func:`refuse_relative_paths` rejects relative output/input paths there instead of writing where
  the data would be lost.
- **Ray's own output**: :func:`start_ray` turns Ray Data's progress bars off and sends Ray's log records and the
  workers' stdout/stderr to ``OUT/ray.log``; the console gets one line about it (:meth:`RaySession.close`).
  Worker lines a job wants on the console (its own progress, printed inside Ray workers) pass ``show``.
- **Closing summary**: :func:`summary_table`.
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from catalog.config import ConfigError

EXIT_USAGE = 2

# Set by Ray's job supervisor for the driver of a submitted job (JSON with metadata.job_submission_id).
_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


class UsageError(Exception):
    """What the user gave the job is wrong: reported as one line, exit status 2."""


def one_line(text: object) -> str:
    return " ".join(str(text).split())


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage block) raised as :class:`UsageError`."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see {self.prog} --help)")


def entry(main: Callable[..., int]) -> Callable[..., int]:
    """Wrap a job's ``main(argv)``: a :class:`UsageError` or :class:`ConfigError` becomes one line and 2."""

    @functools.wraps(main)
    def wrapped(*args: Any, **kwargs: Any) -> int:
        try:
            return main(*args, **kwargs)
        except (UsageError, ConfigError) as err:
            print(f"error: {one_line(err)}", file=sys.stderr, flush=True)
            return EXIT_USAGE

    return wrapped


def load_config(build: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``build(*args)`` with config problems turned into :class:`UsageError`.

    ``build`` only reads and validates config, so a ValueError/TypeError from it is a bad value in the config
    (a dataclass ``__post_init__`` check, a malformed TOML file), not a bug elsewhere in the job.
    """
    try:
        return build(*args, **kwargs)
    except FileNotFoundError as err:
        raise UsageError(f"config: {err}") from None
    except (ValueError, TypeError) as err:  # ConfigError and tomllib.TOMLDecodeError are ValueErrors
        raise UsageError(f"config: {err}") from None


# --- Ray --------------------------------------------------------------------------------------------------


def submitted_job_id() -> str | None:
    """The submission id when this process is the driver of a ``ray job submit`` job, else None."""
    raw = os.environ.get(_JOB_CONFIG_ENV)
    if raw is None:
        return None
    try:
        meta = json.loads(raw).get("metadata") or {}
    except (json.JSONDecodeError, AttributeError):
        meta = {}
    return str(meta.get("job_submission_id") or "unknown")


def refuse_relative_paths(paths: Mapping[str, str | os.PathLike | None]) -> None:
    """Under ``ray job submit``, raise :class:`UsageError` for the first relative path in ``paths``.

    ``paths`` maps what the user wrote (a flag, ``[section] key``) to its value; empty values and URIs pass.
    Outside a Ray job relative paths are fine: they resolve against the directory the user is in.
    """
    job = submitted_job_id()
    if job is None:
        return
    for name, value in paths.items():
        if not value or "://" in str(value):
            continue
        if not Path(value).expanduser().is_absolute():
            raise UsageError(
                f"{name} {str(value)!r} is a relative path; under `ray job submit` (job {job}) it would resolve inside "
                f"Ray's temporary working directory {os.getcwd()}, which Ray deletes after the job: "
                f"give an absolute path on storage the cluster shares")


def ray_address(flag: str | None, configured: str = "") -> str:
    """The one start-up policy: --address, the config's address, RAY_ADDRESS, else an in-process cluster."""
    return flag or configured or os.environ.get("RAY_ADDRESS") or "local"


@dataclass
class RaySession:
    """Ray as a job started (or found) it; ``close`` prints the one line about Ray's own output."""

    address: str
    started: bool
    log_path: Path | None
    cpus: float
    _handler: logging.Handler | None = None
    _worker_log: TextIO | None = None
    _warnings: list[int] = field(default_factory=lambda: [0])
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def describe(self) -> str:
        where = "in-process cluster" if self.address == "local" else f"connected to {self.address}"
        if not self.started:
            where = "already initialised by the caller"
        log = f"; Ray's own log: {self.log_path}" if self.log_path else ""
        return f"ray: {where}, {self.cpus:g} CPUs{log}"

    def close(self) -> None:
        """Stop diverting Ray's output; shut Ray down if this session started it."""
        if self.started:
            import ray

            ray.shutdown()
        if self._handler is not None:
            for lg in _ray_loggers():
                lg.removeHandler(self._handler)
            logging.getLogger("py.warnings").removeHandler(self._handler)
            logging.captureWarnings(False)
            self._handler.close()
        if self._worker_log is not None:
            with self._lock:
                self._worker_log.close()
                self._worker_log = None
        if self.log_path is not None:
            n = self._warnings[0]
            note = f"{n} warning/error line{'s' if n != 1 else ''}" if n else "no warnings"
            print(f"ray: {note} from Ray and its workers; details in {self.log_path}", flush=True)


class _CountingFileHandler(logging.FileHandler):
    def __init__(self, path: Path, counter: list[int]) -> None:
        super().__init__(path, encoding="utf-8")
        self.setLevel(logging.INFO)  # Ray Data logs every scheduler decision at DEBUG
        self.counter = counter
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING:
            self.counter[0] += 1
        super().emit(record)


def _ray_loggers() -> list[logging.Logger]:
    names = [n for n in list(logging.root.manager.loggerDict) if n == "ray" or n.startswith("ray.")]
    return [logging.getLogger(n) for n in sorted(names)]


def _divert_ray_logging(handler: logging.Handler) -> None:
    """Ray's Python loggers write to ``handler`` instead of the console (file handlers they have stay)."""
    for lg in _ray_loggers():
        for h in list(lg.handlers):
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                lg.removeHandler(h)
        # Once per record: on "ray" and on the loggers that do not pass records up to it (ray.data).
        if (lg.name == "ray" or not lg.propagate) and handler not in lg.handlers:
            lg.addHandler(handler)
    logging.getLogger("ray").propagate = False
    logging.getLogger("ray").setLevel(logging.INFO)
    logging.captureWarnings(True)  # Python warnings raised by Ray code in the driver
    logging.getLogger("py.warnings").addHandler(handler)
    logging.getLogger("py.warnings").propagate = False


def _worker_lines_to(session: RaySession, show: Callable[[str], str | None] | None) -> bool:
    """Send the workers' stdout/stderr (which Ray streams to the driver) to the session's log file, printing the
    lines ``show`` maps to a console line. False if this Ray has no such hook (its lines stay in Ray's own logs)."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return False
    if not hasattr(dispatcher, "remove_handler") or not hasattr(dispatcher, "add_handler"):
        return False

    def handle(data: dict[str, Any]) -> None:
        who = f"{data.get('actor_name') or data.get('task_name') or 'worker'} pid={data.get('pid')}"
        with session._lock:
            for line in data.get("lines", []):
                if session._worker_log is not None:
                    session._worker_log.write(f"({who}) {line}\n")
                if show is not None and (shown := show(line)) is not None:
                    print(shown, flush=True)
                elif data.get("is_err") and any(w in line for w in ("WARNING", "Warning", "ERROR", "Error")):
                    session._warnings[0] += 1
            if session._worker_log is not None:
                session._worker_log.flush()

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("vidcurate_job_log", handle)
    return True


def start_ray(address: str, log_dir: str | Path | None, *, show: Callable[[str], str | None] | None = None,
              **init_kwargs: Any) -> RaySession:
    """Start or join Ray by the policy of :func:`ray_address`, with Ray's own output in ``log_dir/ray.log``.

    When the caller (a test, a notebook) already initialised Ray, that Ray is used as it is and left running.
    """
    import ray

    if ray.is_initialized():
        return RaySession(address=address, started=False, log_path=None,
                          cpus=float(ray.cluster_resources().get("CPU", 0)))
    log_path = None
    handler = None
    if log_dir is not None:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        log_path = Path(log_dir).resolve() / "ray.log"
    counter = [0]
    if log_path is not None:
        handler = _CountingFileHandler(log_path, counter)
        import ray.data  # noqa: F401  (configures its loggers on import; divert them after)

        _divert_ray_logging(handler)
    if address == "local":
        init_kwargs.setdefault("include_dashboard", False)
    if handler is not None:
        init_kwargs.setdefault("configure_logging", False)  # Ray would add a console handler of its own
    ray.init(address=address, log_to_driver=True, **init_kwargs)
    session = RaySession(address=address, started=True, log_path=log_path,
                         cpus=float(ray.cluster_resources().get("CPU", 0)), _handler=handler, _warnings=counter)
    if handler is not None:
        _divert_ray_logging(handler)  # ray.init may have added console handlers of its own
        try:
            from ray.data import DataContext

            ctx = DataContext.get_current()
            ctx.enable_progress_bars = False
            ctx.print_on_execution_start = False
        except ImportError:
            pass
        session._worker_log = log_path.open("a", encoding="utf-8")
        _worker_lines_to(session, show)
    return session


# --- the closing summary -----------------------------------------------------------------------------------


def summary_table(title: str, rows: Iterable[tuple[str, object]], out: TextIO | None = None) -> None:
    """A two-column table: what was counted, and its value (multi-line values stay aligned)."""
    out = sys.stdout if out is None else out
    rows = [(k, str(v)) for k, v in rows]
    width = max((len(k) for k, _ in rows), default=0)
    out.write(f"{title}\n")
    for key, value in rows:
        lines = value.split("\n") or [""]
        out.write(f"  {key.ljust(width)}  {lines[0]}\n")
        for extra in lines[1:]:
            out.write(f"  {' ' * width}  {extra}\n")
    out.flush()


def by_reason(counts: Mapping[str, int] | Sequence[tuple[str, int]]) -> str:
    """``reason n, reason n`` sorted by count, or ``none``."""
    items = sorted(dict(counts).items(), key=lambda kv: (-kv[1], kv[0]))
    return ", ".join(f"{k} {v}" for k, v in items if v) or "none"
