"""A private PostgreSQL cluster (Debian's binaries, our own data directory), ready for Debezium.

The cluster belongs to this stack only: its own data directory, port and socket directory, never the
system's ``postgresql`` service. PostgreSQL refuses to run as root, so when the stack runs as root the
server runs as the ``postgres`` account that Debian's packages create, and the data directory is chowned
to it.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import re
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from devstack.apt import apt_candidate, ensure_apt_packages
from devstack.config import REPO_ROOT, StackConfig
from devstack.process import (
    StackError,
    ensure_port_free,
    log_file,
    run_logged,
    running_pid,
    say,
    spawn,
    wait_for_service,
)
from devstack.process import stop as stop_process

NAME = "postgres"
MIN_VERSION = 15
DATABASE = "engagement"
ROLE = "engagement"
PASSWORD = "engagement"  # noqa: S105 - the local stack's well-known dev password (config.pg_dsn)
SUPERUSER = "postgres"
MIGRATIONS_DIR = REPO_ROOT / "sql" / "postgres"
# Unix socket paths are limited to 107 bytes on Linux.
_MAX_SOCKET_PATH = 107
OUTSIDE_DATA_ROOT = Path("/var/lib/engagement-pipeline")


def _installed_bin_dirs() -> list[tuple[int, Path]]:
    found = []
    for candidate in Path("/usr/lib/postgresql").glob("*/bin/postgres"):
        if candidate.parent.parent.name.isdigit():
            found.append((int(candidate.parent.parent.name), candidate.parent))
    return sorted(found, reverse=True)


def bin_dir() -> Path:
    override = os.environ.get("STACK_PG_BIN_DIR")
    if override:
        return Path(override)
    for version, directory in _installed_bin_dirs():
        if version >= MIN_VERSION:
            return directory
    raise StackError(f"PostgreSQL {MIN_VERSION}+ server binaries not found under /usr/lib/postgresql")


def install(cfg: StackConfig) -> None:
    if os.environ.get("STACK_PG_BIN_DIR") or any(v >= MIN_VERSION for v, _ in _installed_bin_dirs()):
        return
    # Debian 12 calls it postgresql-15; later releases only ship newer majors under the meta package.
    package = "postgresql-15" if apt_candidate("postgresql-15") else "postgresql"
    ensure_apt_packages(cfg, [package], "PostgreSQL")
    bin_dir()


def _stack_digest(cfg: StackConfig) -> str:
    return hashlib.sha1(str(cfg.stack_dir).encode()).hexdigest()[:12]  # noqa: S324 - a name, not security


def _server_user_can_enter(directory: Path) -> bool:
    """Whether the server's account can traverse to ``directory`` (we may be root, it is not)."""
    if _server_user() is None:
        return True
    directory.mkdir(parents=True, exist_ok=True)
    return subprocess.run(_as_server_user(["test", "-x", str(directory)]), check=False).returncode == 0


def _data_dir(cfg: StackConfig) -> Path:
    """The cluster's directory: ``$STACK_DIR/data/postgres``, or a symlink there to ``OUTSIDE_DATA_ROOT``.

    A checkout below a directory the postgres account cannot enter (a 0700 home or ``mktemp -d``, as CI
    clones may be) cannot hold the cluster itself; the symlink keeps ``$STACK_DIR`` the one place to look
    and lets ``down --purge`` find it.
    """
    link = cfg.data_dir / "postgres"
    if link.is_symlink():
        return link.resolve()
    if link.exists() or _server_user_can_enter(cfg.data_dir):
        return link
    outside = OUTSIDE_DATA_ROOT / f"postgres-{_stack_digest(cfg)}"
    OUTSIDE_DATA_ROOT.mkdir(parents=True, exist_ok=True)
    OUTSIDE_DATA_ROOT.chmod(0o755)
    link.symlink_to(outside, target_is_directory=True)
    say(f"postgres: {cfg.data_dir} is closed to the postgres account; the cluster lives in {outside}")
    return outside


def socket_dir(cfg: StackConfig) -> Path:
    preferred = cfg.run_dir / "pgsock"
    if len(f"{preferred}/.s.PGSQL.{cfg.pg_port}") <= _MAX_SOCKET_PATH and _server_user_can_enter(cfg.run_dir):
        return preferred
    # A deep STACK_DIR would overflow the socket path, and one the server cannot enter cannot hold its
    # socket: fall back to a short per-stack directory in the system's temporary directory.
    return Path(tempfile.gettempdir()) / f"engagement-stack-{_stack_digest(cfg)}"


def _server_user() -> pwd.struct_passwd | None:
    """The account the server runs as when we are root (None: run as ourselves)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError as exc:
        raise StackError(
            "running as root needs the 'postgres' account that Debian's postgresql packages create"
        ) from exc


def _as_server_user(argv: list[str]) -> list[str]:
    user = _server_user()
    if user is None:
        return argv
    # setpriv execs in place (unlike su/runuser), so the recorded PID is the postmaster itself.
    return ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups", "--", *argv]


def _own(path: Path) -> None:
    user = _server_user()
    path.mkdir(parents=True, exist_ok=True)
    if user is not None:
        os.chown(path, user.pw_uid, user.pw_gid)
    path.chmod(0o700)


def _initdb(cfg: StackConfig) -> None:
    data = _data_dir(cfg)
    if (data / "PG_VERSION").exists():
        return
    if data.exists() and any(data.iterdir()):
        raise StackError(f"{data} exists but holds no PostgreSQL cluster; move it away and run up again")
    _own(data)
    check = subprocess.run(_as_server_user(["test", "-w", str(data)]), check=False)
    if check.returncode != 0:
        raise StackError(
            f"the postgres account cannot reach {data} (a parent directory is not world-searchable); "
            "set STACK_DIR to a directory outside /root, e.g. /var/tmp/engagement-stack"
        )
    say(f"postgres: creating a private cluster in {data}")
    run_logged(
        _as_server_user(
            [
                str(bin_dir() / "initdb"),
                "--pgdata",
                str(data),
                "--username",
                SUPERUSER,
                # Local (socket) connections are trusted: the socket directory is private to the stack's owner.
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C.UTF-8",
                "--no-sync",
            ]
        ),
        log_file(cfg, NAME),
        "initialising the PostgreSQL cluster",
    )


def start(cfg: StackConfig) -> None:
    if running_pid(cfg, NAME) is not None:
        return
    ensure_port_free(NAME, cfg.pg_port)
    _initdb(cfg)
    sockets = socket_dir(cfg)
    _own(sockets)
    settings = {
        "port": cfg.pg_port,
        "listen_addresses": "127.0.0.1",
        "unix_socket_directories": sockets,
        # Debezium's pgoutput decoding.
        "wal_level": "logical",
        "max_replication_slots": 10,
        "max_wal_senders": 10,
        # Each checkout's slot may hold WAL while Connect is down; cap what that can cost on a laptop.
        "max_slot_wal_keep_size": "2GB",
        "shared_buffers": "128MB",
        "log_destination": "stderr",
        "logging_collector": "off",
        "log_line_prefix": "%m [%p] %q%u@%d ",
    }
    argv = [str(bin_dir() / "postgres"), "-D", str(_data_dir(cfg))]
    for key, value in settings.items():
        argv += ["-c", f"{key}={value}"]
    spawn(cfg, NAME, _as_server_user(argv))


def psql(cfg: StackConfig, sql: str, database: str = "postgres", role: str | None = None) -> str:
    """Run SQL as the superuser over the private socket; stops at the first error."""
    script = (f"SET ROLE {role};\n" if role else "") + sql
    result = subprocess.run(
        [
            str(bin_dir() / "psql"),
            "--no-psqlrc",
            "--quiet",
            "--tuples-only",
            "--no-align",
            "--set=ON_ERROR_STOP=1",
            f"--host={socket_dir(cfg)}",
            f"--port={cfg.pg_port}",
            f"--username={SUPERUSER}",
            f"--dbname={database}",
        ],
        input=script,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise StackError(f"SQL failed on {database}: {result.stderr.strip()}")
    return result.stdout.strip()


def _bootstrap(cfg: StackConfig) -> None:
    """Create the role and database if missing; safe to repeat on every `up`."""
    # Every interpolated value is a constant of this module, never input.
    psql(
        cfg,
        f"""
        DO $$ BEGIN
            IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{ROLE}') THEN
                CREATE ROLE {ROLE};
            END IF;
        END $$;
        ALTER ROLE {ROLE} WITH LOGIN REPLICATION PASSWORD '{PASSWORD}';
        SELECT 'CREATE DATABASE {DATABASE} OWNER {ROLE}'
            WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '{DATABASE}') \\gexec
        """,  # noqa: S608
    )


def _migration_files() -> list[Path]:
    return sorted(p for p in MIGRATIONS_DIR.glob("*.sql") if re.match(r"^\d+_", p.name))


def apply_migrations(cfg: StackConfig) -> list[str]:
    """Apply sql/postgres/*.sql in order, each once, as the application role (so it owns the tables,
    which CREATE PUBLICATION ... FOR TABLE requires). Returns the files applied now."""
    psql(
        cfg,
        """
        CREATE TABLE IF NOT EXISTS schema_migrations (
            filename   TEXT PRIMARY KEY,
            sha256     TEXT NOT NULL,
            applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
        );
        """,
        database=DATABASE,
        role=ROLE,
    )
    applied = dict(
        line.split("|", 1)
        for line in psql(cfg, "SELECT filename, sha256 FROM schema_migrations", database=DATABASE).splitlines()
        if line
    )
    newly_applied = []
    for path in _migration_files():
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if path.name in applied:
            if applied[path.name] != digest:
                say(
                    f"postgres: warning: {path.name} changed after it was applied; the database keeps the old "
                    "version (`scripts/stack down --purge` starts from scratch)"
                )
            continue
        # One transaction per file: a failing migration leaves neither half a schema nor a bookkeeping row.
        psql(
            cfg,
            "BEGIN;\n"
            f"{path.read_text()}\n;\n"
            f"INSERT INTO schema_migrations (filename, sha256) VALUES ('{path.name}', '{digest}');\n"
            "COMMIT;\n",
            database=DATABASE,
            role=ROLE,
        )
        newly_applied.append(path.name)
    return newly_applied


def _accepting_connections(cfg: StackConfig) -> bool:
    result = subprocess.run(
        [str(bin_dir() / "pg_isready"), f"--host={socket_dir(cfg)}", f"--port={cfg.pg_port}", "--timeout=2"],
        capture_output=True,
        check=False,
    )
    return result.returncode == 0


def wait_ready(cfg: StackConfig, timeout: float) -> None:
    """Ready = accepting connections, role and database present, every migration applied."""
    wait_for_service(cfg, NAME, lambda: _accepting_connections(cfg), f"PostgreSQL on 127.0.0.1:{cfg.pg_port}", timeout)
    _bootstrap(cfg)
    for name in apply_migrations(cfg):
        say(f"postgres: applied {name}")


def prepare_replication_slot(cfg: StackConfig, slot: str, fresh: bool) -> None:
    """Make sure Debezium can take its slot: no stale walsender holds it, and with ``fresh`` (Connect has no
    stored offsets) drop it so the connector snapshots and recreates it consistently with its offsets."""
    if not re.fullmatch(r"[a-z0-9_]{1,63}", slot):
        raise StackError(f"invalid replication slot name {slot!r}")
    # The slot name is validated above, so interpolating it is safe (S608).
    psql(
        cfg,
        f"""
        SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots
            WHERE slot_name = '{slot}' AND active_pid IS NOT NULL;
        """,  # noqa: S608
    )
    if fresh:
        # The terminated walsender releases the slot asynchronously; wait for that before dropping it.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            query = f"SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{slot}' AND active"  # noqa: S608
            busy = psql(cfg, query)
            if busy == "0":
                break
            time.sleep(0.2)
        psql(
            cfg,
            f"SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = '{slot}'",  # noqa: S608
        )


def stop(cfg: StackConfig) -> None:
    # SIGINT to the postmaster alone is PostgreSQL's "fast" shutdown: it disconnects clients (including
    # Debezium's walsender) instead of waiting for them like SIGTERM's "smart" mode, and lets the postmaster
    # stop its own children in order.
    stop_process(cfg, NAME, signal.SIGINT, timeout=60.0, group=False)


def endpoint(cfg: StackConfig) -> str:
    return f"postgresql://{ROLE}:{PASSWORD}@127.0.0.1:{cfg.pg_port}/{DATABASE} (socket dir {socket_dir(cfg)})"
