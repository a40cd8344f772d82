"""redis-server from Debian, private to the stack: loopback only, data in the stack directory."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

from devstack.apt import ensure_apt_packages
from devstack.config import StackConfig
from devstack.process import ensure_port_free, running_pid, spawn, wait_for_service
from devstack.process import stop as stop_process

NAME = "redis"


def _binary() -> str | None:
    return shutil.which("redis-server") or ("/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None)


def install(cfg: StackConfig) -> None:
    if _binary() is None:
        ensure_apt_packages(cfg, ["redis-server"], "Redis")


def start(cfg: StackConfig) -> None:
    if running_pid(cfg, NAME) is not None:
        return
    ensure_port_free(NAME, cfg.redis_port)
    data = cfg.data_dir / "redis"
    data.mkdir(parents=True, exist_ok=True)
    # Only command-line options, no config file: Debian's /etc/redis/redis.conf belongs to the system service.
    argv = [
        _binary() or "redis-server",
        "--bind", "127.0.0.1",
        "--port", str(cfg.redis_port),
        # Protected mode only matters for non-loopback clients without a password; we accept none.
        "--protected-mode", "no",
        "--daemonize", "no",
        "--dir", str(data),
        "--logfile", "",
        # Persistent as production's Redis should be (docs/restarts.md, "What the plan assumes"): the
        # append-only file, synced every second, keeps the ranking across a crash (kill -9), not only across a
        # clean `down`/`up`; at most the last second of writes is lost.
        "--appendonly", "yes",
        "--appendfsync", "everysec",
        "--save", "60 1",
    ]  # fmt: skip
    spawn(cfg, NAME, argv)


def ping(port: int, timeout: float = 1.0) -> bool:
    # RESP inline command; a server still loading its dump answers -LOADING instead of +PONG.
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        sock.sendall(b"PING\r\n")
        return sock.recv(64).startswith(b"+PONG")


def wait_ready(cfg: StackConfig, timeout: float) -> None:
    wait_for_service(cfg, NAME, lambda: ping(cfg.redis_port), f"Redis on 127.0.0.1:{cfg.redis_port}", timeout)


def stop(cfg: StackConfig) -> None:
    # SIGTERM makes redis save its dump and exit.
    stop_process(cfg, NAME)


def endpoint(cfg: StackConfig) -> str:
    return cfg.redis_url
