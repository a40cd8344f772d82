"""Run, start, stop and wait on the processes of the local stack, and report progress.

Each service is one detached process group whose PID is recorded in ``run/<name>.pid`` and whose output
goes to ``logs/<name>.log``; ``stop`` only ever signals processes recorded there.

Everything here prints to stderr so that commands whose stdout is meant for machines (``scripts/stack env``)
stay clean, and so that pytest shows install progress of a cold session fixture with ``-s``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import psutil

from devstack.config import StackConfig


class StackError(RuntimeError):
    """A service could not be installed, started or reached."""


def say(message: str) -> None:
    print(f"[stack] {message}", file=sys.stderr, flush=True)


def pid_file(cfg: StackConfig, name: str) -> Path:
    return cfg.run_dir / f"{name}.pid"


def log_file(cfg: StackConfig, name: str) -> Path:
    return cfg.log_dir / f"{name}.log"


def tail_text(path: Path, lines: int = 15) -> str:
    """The last lines of a log, for error messages (the full log is named next to it)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 16384))
            text = handle.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


# --- foreground commands -------------------------------------------------------------------------------------


def run_logged(
    argv: Sequence[str | Path],
    log: Path,
    what: str,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    heartbeat: float = 20.0,
) -> None:
    """Run a slow install command with its output in ``log``, printing a progress line now and then."""
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with open(log, "ab") as out:
        out.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(map(str, argv))}\n".encode())
        out.flush()
        try:
            proc = subprocess.Popen(
                [str(a) for a in argv],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})},
                cwd=cwd,
            )
        except FileNotFoundError as exc:
            raise StackError(f"{what}: {argv[0]} is not installed") from exc
        while True:
            try:
                code = proc.wait(timeout=heartbeat)
                break
            except subprocess.TimeoutExpired:
                say(f"... still {what} ({time.monotonic() - started:.0f}s so far, output in {log})")
    if code != 0:
        raise StackError(f"{what} failed (exit {code}); see {log}:\n{tail_text(log)}")


# --- background services -------------------------------------------------------------------------------------


def _is_zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def running_pid(cfg: StackConfig, name: str) -> int | None:
    """PID of the recorded process if it is still alive; forgets the record of one that has exited."""
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
        # Someone else's process, e.g. a stack started by root looked at by another user: alive unless a zombie.
        pass
    # `kill -0` succeeds on zombies. A service that died while this very process started it stays one until
    # reaped, so reap it; an orphaned one stays one until PID 1 gets round to it. Either way it is gone.
    try:
        reaped, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        reaped = 0
    if reaped == pid or _is_zombie(pid):
        path.unlink(missing_ok=True)
        return None
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
        proc = subprocess.Popen(
            list(argv),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            cwd=cwd,
            # Its own session, so that it outlives `scripts/stack up` and a terminal's Ctrl-C does not reach it.
            start_new_session=True,
        )
    pid_file(cfg, name).write_text(str(proc.pid))
    return proc.pid


def stop(
    cfg: StackConfig,
    name: str,
    sig: signal.Signals = signal.SIGTERM,
    timeout: float = 30.0,
    group: bool = True,
) -> bool:
    """Send ``sig`` to the recorded process group (or with ``group=False`` only to its leader, for servers
    that stop their own children in order) and wait for it to exit, SIGKILLing the group after ``timeout``.

    A zombie counts as stopped, so ``down`` need not wait for a slow PID 1 to reap services whose parent (an
    earlier ``scripts/stack up``) has exited. True if something was running.
    """
    pid = running_pid(cfg, name)
    if pid is None:
        return False
    with contextlib.suppress(ProcessLookupError):
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    deadline = time.monotonic() + timeout
    while running_pid(cfg, name) is not None:
        if time.monotonic() >= deadline:
            say(f"{name} did not stop within {timeout:.0f}s; killing it")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            break
        time.sleep(0.1)
    pid_file(cfg, name).unlink(missing_ok=True)
    return True


# --- ports and readiness -------------------------------------------------------------------------------------


def port_open(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


PORT_RELEASE_SECONDS = 75.0
"""How long a service's start waits for its port to be released: Linux keeps the port of a closed connection in
TIME-WAIT for 60 s."""


def port_bindable(port: int, host: str = "127.0.0.1") -> bool:
    """Whether ``port`` can be bound now without ``SO_REUSEADDR``: the strictest of the services, since Kafka's
    listener is refused even by a closed connection's TIME-WAIT on its port.

    A listener is not the only holder: a closed connection of the service's previous run holds its port for its
    TIME-WAIT, and a port inside the kernel's range of ephemeral ports (``net.ipv4.ip_local_port_range``; the
    stack's defaults lie below it, docs/local-stack.md) may be the local end of any process's outgoing
    connection.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                return False
            raise
    return True


def ensure_port_free(name: str, port: int, timeout: float = PORT_RELEASE_SECONDS) -> None:
    """Fail early and clearly when something we did not start listens on one of our ports; wait while
    connections that are closing still hold it.

    Without the wait, a service started just after another stack stopped failed at random: Kafka exited with
    "Address already in use" because a closed connection of the other stack's broker had used the port as its
    local end, when the stack's ports were still inside the ephemeral range (docs/local-stack.md, "Ports").
    """
    if port_open(port):
        raise StackError(
            f"cannot start {name}: 127.0.0.1:{port} is already in use by a process this stack did not start "
            f"(another checkout? give it its own STACK_DIR and STACK_PORT_OFFSET, see docs/local-stack.md)"
        )
    deadline = time.monotonic() + timeout
    if port_bindable(port):
        return
    say(f"{name}: 127.0.0.1:{port} is held by another process's connection; waiting up to {timeout:.0f}s for it")
    while not port_bindable(port):
        if time.monotonic() >= deadline:
            raise StackError(
                f"cannot start {name}: 127.0.0.1:{port} is still held by another process's connection after "
                f"{timeout:.0f}s (is it inside net.ipv4.ip_local_port_range, where the kernel gives ports to "
                f"outgoing connections?); try again, or move the stack with STACK_PORT_OFFSET "
                f'(docs/local-stack.md, "Ports")'
            )
        time.sleep(0.5)


def wait_for_service(
    cfg: StackConfig,
    name: str,
    check: Callable[[], bool],
    what: str,
    timeout: float,
    interval: float = 0.25,
) -> None:
    """Poll ``check`` until True; fail fast (with the log's tail) if the process dies meanwhile.

    ``check`` may raise StackError to report a definite failure (e.g. a connector task FAILED); any other
    exception just means "not yet".
    """
    log = log_file(cfg, name)
    deadline = time.monotonic() + timeout
    while True:
        if running_pid(cfg, name) is None:
            raise StackError(f"{name} is not running (it exited or was never started); see {log}:\n{tail_text(log)}")
        try:
            ready = check()
        except StackError:
            raise
        except Exception:  # noqa: BLE001 - a probe may fail in any way until the service is up
            ready = False
        if ready:
            return
        if time.monotonic() >= deadline:
            raise StackError(f"{what} was not ready after {timeout:.0f}s; see {log}:\n{tail_text(log)}")
        time.sleep(interval)


# --- jobs started by a driver (scripts/run-local, the benchmarks) --------------------------------------------


def _start_time(pid: int) -> str | None:
    """The process's start time: with the pid, an identity that pid reuse cannot fake."""
    try:
        return repr(psutil.Process(pid).create_time())
    except psutil.Error:
        return None


def record_job(cfg: StackConfig, name: str, session: int) -> None:
    """Remembers that this process (the driver) started the job whose processes are in ``session``.

    The job's Prism and Java processes are its launcher's children and stay in its session even when the
    launcher dies, so the session finds them; the driver's pid and start time tell whether anyone still
    owns them.
    """
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    driver = os.getpid()
    (cfg.run_dir / f"job-{name}.session").write_text(f"{session} {driver} {_start_time(driver)}\n")


def forget_job(cfg: StackConfig, name: str) -> None:
    (cfg.run_dir / f"job-{name}.session").unlink(missing_ok=True)


def stop_orphaned_jobs(cfg: StackConfig, timeout: float = 10.0) -> list[str]:
    """Stops the processes of jobs whose driver died without stopping them (e.g. SIGKILL), and says so.

    Returns "command (pid)" for each process stopped. A job whose driver still runs is left alone.
    """
    from devstack.cpu_usage import processes, session_of

    stopped: list[str] = []
    for record in sorted(cfg.run_dir.glob("job-*.session")) if cfg.run_dir.is_dir() else []:
        try:
            session_text, driver_text, driver_start = record.read_text().split()
            session, driver = int(session_text), int(driver_text)
        except (OSError, ValueError):
            record.unlink(missing_ok=True)
            continue
        if _start_time(driver) == driver_start:
            continue  # its driver is alive and stops it itself
        members = {process.pid: process.info["name"] for process in processes() if session_of(process) == session}
        for pid in members:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(_start_time(pid) and not _is_zombie(pid) for pid in members):
            time.sleep(0.1)
        for pid in members:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if members:
            names = ", ".join(f"{command} ({pid})" for pid, command in sorted(members.items()))
            say(f"stopped what a job started by a driver that died left running: {names}")
            stopped += [f"{command} ({pid})" for pid, command in sorted(members.items())]
        record.unlink(missing_ok=True)
    return stopped


def stop_job(
    cfg: StackConfig, process: subprocess.Popen, name: str, log_name: str, program: str, timeout: float = 30.0
) -> None:
    """SIGINT to the job's process group (its own session), SIGKILL if it is still there after ``timeout``;
    then its record goes, as nothing is left to stop."""
    if process.poll() is None:
        print(f"{program}: stopping {name}", file=sys.stderr)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    forget_job(cfg, log_name)
