"""Start, stop and wait on the background processes of the local stack.

Each service is one detached process group whose PID is recorded in ``run/<name>.pid`` and whose output
goes to ``logs/<name>.log``; ``stop`` only ever signals processes recorded there.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from devstack.config import StackConfig


class StackError(RuntimeError):
    """A service could not be installed, started or reached."""


def pid_file(cfg: StackConfig, name: str) -> Path:
    return cfg.run_dir / f"{name}.pid"


def log_file(cfg: StackConfig, name: str) -> Path:
    return cfg.log_dir / f"{name}.log"


def running_pid(cfg: StackConfig, name: str) -> int | None:
    """PID of the recorded process if it is still alive."""
    path = pid_file(cfg, name)
    try:
        pid = int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        path.unlink(missing_ok=True)
        return None
    except PermissionError:
        pass
    return pid


def spawn(
    cfg: StackConfig,
    name: str,
    argv: Sequence[str],
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> int:
    """Start ``argv`` detached in its own process group, unless it already runs."""
    existing = running_pid(cfg, name)
    if existing is not None:
        return existing
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    cfg.log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_file(cfg, name), "ab") as log:
        proc = subprocess.Popen(  # noqa: S603 - argv is built by the stack, never from user input
            list(argv),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            cwd=cwd,
            start_new_session=True,
        )
    pid_file(cfg, name).write_text(str(proc.pid))
    return proc.pid


def stop(cfg: StackConfig, name: str, timeout: float = 30.0) -> bool:
    """SIGTERM the recorded process group, SIGKILL after ``timeout``; True if something was stopped."""
    pid = running_pid(cfg, name)
    if pid is None:
        return False
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        # Reap it if it is our child (when started from this same process).
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.2)
    else:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    pid_file(cfg, name).unlink(missing_ok=True)
    return True


def port_open(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_until(
    check: Callable[[], bool],
    what: str,
    timeout: float = 120.0,
    interval: float = 0.25,
    log: Path | None = None,
) -> None:
    """Poll ``check`` until it returns True; raise StackError naming ``what`` (and the log) on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:  # noqa: BLE001 - a readiness probe may fail in any way until the service is up
            pass
        time.sleep(interval)
    hint = f"; see {log}" if log else ""
    raise StackError(f"{what} was not ready after {timeout:.0f}s{hint}")
