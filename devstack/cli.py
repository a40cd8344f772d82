"""``scripts/stack``: bring the local stack up and down, and show where it listens.

scripts/stack up [SERVICE ...]     install what is missing, start what is not running, wait until ready
scripts/stack down [--purge]       stop what this stack started (--purge also deletes its data)
scripts/stack status               which services run, and where
scripts/stack logs [SERVICE] [-f]  the end of the service logs (all services without SERVICE)
scripts/stack env                  shell exports of the endpoints: eval "$(scripts/stack env)"
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import importlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType

from devstack.config import INSTANCE_ENV, INSTANCES, REPO_ROOT, StackConfig, instance, load_config, use_instance
from devstack.process import StackError, log_file, running_pid, say, stop_orphaned_jobs

# Start order; `down` stops in reverse. Each entry is a module under devstack/ with the service interface.
SERVICE_MODULES = ("postgres", "redis_server", "kafka", "connect", "bigquery_emulator", "external_api")
# Services (by NAME) that must be ready before another one starts.
DEPENDS_ON = {"connect": ("postgres", "kafka")}
INTERFACE = ("NAME", "install", "start", "wait_ready", "stop", "endpoint")
READY_TIMEOUT = float(os.environ.get("STACK_READY_TIMEOUT", "180"))


@dataclass(frozen=True)
class Service:
    module_name: str
    module: ModuleType | None
    missing_reason: str = ""

    @property
    def name(self) -> str:
        return self.module.NAME if self.module is not None else self.module_name


def load_services() -> list[Service]:
    """Import the service modules; a module that is absent or incomplete is reported and skipped."""
    services = []
    for module_name in SERVICE_MODULES:
        try:
            module = importlib.import_module(f"devstack.{module_name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"devstack.{module_name}":
                raise
            services.append(Service(module_name, None, f"devstack/{module_name}.py does not exist"))
            continue
        lacking = [attr for attr in INTERFACE if not hasattr(module, attr)]
        if lacking:
            services.append(Service(module_name, None, f"devstack/{module_name}.py lacks {', '.join(lacking)}"))
        else:
            services.append(Service(module_name, module))
    return services


def _select(services: list[Service], wanted: list[str] | None) -> list[Service]:
    """The requested services plus what they depend on, in start order."""
    if not wanted:
        return services
    by_key = {key: s for s in services for key in (s.name, s.module_name)}
    unknown = [w for w in wanted if w not in by_key]
    if unknown:
        raise StackError(f"unknown service(s): {', '.join(unknown)}; known: {', '.join(s.name for s in services)}")
    names: set[str] = set()
    pending = [by_key[w].name for w in wanted]
    while pending:
        name = pending.pop()
        if name not in names:
            names.add(name)
            pending.extend(DEPENDS_ON.get(name, ()))
    return [s for s in services if s.name in names]


@contextmanager
def _stack_lock(cfg: StackConfig) -> Iterator[None]:
    """One `up`/`down` at a time per stack (e.g. a test session starting while the CLI runs)."""
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    with open(cfg.run_dir / "stack.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say("another `scripts/stack` command is working on this stack; waiting for it")
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _install_all(cfg: StackConfig, services: list[Service]) -> None:
    """Install in parallel: apt and Maven downloads overlap (each guards its own shared state)."""

    def install(service: Service) -> None:
        assert service.module is not None
        try:
            service.module.install(cfg)
        except StackError as exc:
            raise StackError(f"installing {service.name} failed: {exc}") from exc

    with ThreadPoolExecutor(max_workers=4, thread_name_prefix="install") as pool:
        futures = [pool.submit(install, s) for s in services]
        errors = [f.exception() for f in futures if f.exception() is not None]
    if errors:
        raise errors[0]  # type: ignore[misc]


def _start_and_wait(cfg: StackConfig, services: list[Service]) -> None:
    """Start every service whose dependencies are ready, then wait for them, wave by wave.

    Independent services boot concurrently (the JVMs take the longest), dependants follow once what they
    need is ready. ``wait_ready`` runs for services that were already running too: it is cheap then, and it
    is where PostgreSQL applies new migrations.
    """
    ready: set[str] = set()
    remaining = list(services)
    while remaining:
        wave = [s for s in remaining if all(dep in ready for dep in DEPENDS_ON.get(s.name, ()))]
        if not wave:
            raise StackError(f"unsatisfiable dependencies among {', '.join(s.name for s in remaining)}")
        started: dict[str, float] = {}
        for service in wave:
            assert service.module is not None
            if running_pid(cfg, service.name) is None:
                say(f"starting {service.name}")
                started[service.name] = time.monotonic()
                service.module.start(cfg)
        for service in wave:
            assert service.module is not None
            service.module.wait_ready(cfg, READY_TIMEOUT)
            if service.name in started:
                say(f"{service.name} ready in {time.monotonic() - started[service.name]:.1f}s")
            ready.add(service.name)
        remaining = [s for s in remaining if s not in wave]


def ensure_up(cfg: StackConfig, services: list[str] | None = None) -> None:
    """Make the stack (or the named services and their dependencies) run and be ready; idempotent.

    Used by ``scripts/stack up`` and by the integration tests' session fixture. Raises StackError.
    """
    selected = _select(load_services(), services)
    for service in selected:
        if service.module is None:
            say(f"skipping {service.name}: {service.missing_reason}")
    available = [s for s in selected if s.module is not None]
    with _stack_lock(cfg):
        _install_all(cfg, available)
        _start_and_wait(cfg, available)


BIGQUERY_SQL_DIR = REPO_ROOT / "sql" / "bigquery"
_CREATED_NAME = re.compile(r"CREATE\s+(?:TABLE\s+IF\s+NOT\s+EXISTS|OR\s+REPLACE\s+VIEW)\s+`[^`]*\.([A-Za-z0-9_]+)`")


def ensure_tables(cfg: StackConfig, dataset: str | None = None) -> None:
    """The project's tables and views in ``dataset`` (default: the stack's) of the emulator, through
    scripts/bigquery-ddl; idempotent, silent unless it fails.

    Applying the DDL takes the emulator about two seconds, which every ``scripts/backfill`` and
    ``scripts/run-local`` paid. It is skipped when the same DDL (same files, project and dataset) was applied
    before and the emulator lists every table and view it creates."""
    dataset = dataset or cfg.bq_dataset
    sql = "".join(path.read_text() for path in sorted(BIGQUERY_SQL_DIR.glob("*.sql")))
    digest = hashlib.sha256(f"{cfg.bq_project}\n{dataset}\n{sql}".encode()).hexdigest()
    marker = cfg.data_dir / "bigquery-ddl" / f"{dataset}.sha256"
    if marker.is_file() and marker.read_text() == digest and _lists_tables(cfg, dataset, _CREATED_NAME.findall(sql)):
        return
    result = subprocess.run(
        [str(REPO_ROOT / "scripts" / "bigquery-ddl"), "--project", cfg.bq_project, "--dataset",
         dataset, "--apply-to-emulator", cfg.bq_rest_endpoint],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if result.returncode != 0:
        raise StackError(f"creating the BigQuery tables failed:\n{result.stdout}{result.stderr}")
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(digest)


def _lists_tables(cfg: StackConfig, dataset: str, names: list[str]) -> bool:
    """Whether the emulator's dataset holds every one of ``names`` (tables and views); False if unsure."""
    url = f"{cfg.bq_rest_endpoint}/bigquery/v2/projects/{cfg.bq_project}/datasets/{dataset}/tables?maxResults=1000"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - the stack's own http endpoint
            listing = json.load(response)
    except (OSError, ValueError):
        return False
    present = {table.get("tableReference", {}).get("tableId") for table in listing.get("tables") or []}
    return bool(names) and set(names) <= present


def _cmd_up(cfg: StackConfig, args: argparse.Namespace) -> int:
    started = time.monotonic()
    stop_orphaned_jobs(cfg)
    ensure_up(cfg, args.services or None)
    if args.tables:
        ensure_tables(cfg)
    print(f"stack up in {time.monotonic() - started:.1f}s ({cfg.stack_dir})")
    _print_status(cfg, _select(load_services(), args.services or None))
    return 0


def _cmd_down(cfg: StackConfig, args: argparse.Namespace) -> int:
    stop_orphaned_jobs(cfg)
    with _stack_lock(cfg):
        for service in reversed(load_services()):
            if service.module is None:
                continue
            if running_pid(cfg, service.name) is not None:
                say(f"stopping {service.name}")
                service.module.stop(cfg)
        if args.purge:
            say(f"deleting {cfg.data_dir} and {cfg.log_dir}")
            # A service whose account cannot enter STACK_DIR keeps its data elsewhere behind a symlink.
            for entry in cfg.data_dir.glob("*"):
                if entry.is_symlink():
                    shutil.rmtree(entry.resolve(), ignore_errors=True)
            shutil.rmtree(cfg.data_dir, ignore_errors=True)
            shutil.rmtree(cfg.log_dir, ignore_errors=True)
    print("stack down")
    return 0


def _print_status(cfg: StackConfig, services: list[Service]) -> bool:
    all_up = True
    width = max(len(s.name) for s in services)
    for service in services:
        if service.module is None:
            print(f"  {service.name:<{width}}  n/a   ({service.missing_reason})")
            continue
        pid = running_pid(cfg, service.name)
        all_up = all_up and pid is not None
        state = f"up    pid {pid:<7}" if pid is not None else "down" + " " * 13
        print(f"  {service.name:<{width}}  {state}  {service.module.endpoint(cfg)}")
    return all_up


def _cmd_status(cfg: StackConfig, args: argparse.Namespace) -> int:
    print(f"stack {cfg.stack_dir}")
    # Exit status 3 (as `systemctl is-active` would) lets scripts ask "is everything up?".
    return 0 if _print_status(cfg, load_services()) else 3


def _cmd_logs(cfg: StackConfig, args: argparse.Namespace) -> int:
    if args.service == "install":
        files = sorted(cfg.log_dir.glob("install-*.log"))
    elif args.service:
        services = load_services()
        matches = [s for s in services if args.service in (s.name, s.module_name)]
        if not matches:
            raise StackError(f"unknown service {args.service!r}; known: {', '.join(s.name for s in services)}")
        files = [log_file(cfg, matches[0].name)]
    else:
        files = sorted(cfg.log_dir.glob("*.log"))
    files = [f for f in files if f.exists()]
    if not files:
        raise StackError(f"no logs yet in {cfg.log_dir}")
    argv = ["tail", "-n", str(args.lines), *(["-F"] if args.follow else []), *map(str, files)]
    sys.stdout.flush()
    os.execvp("tail", argv)  # noqa: S606 - hand the terminal to tail (Ctrl-C ends it)


def stack_env(cfg: StackConfig) -> dict[str, str]:
    """Endpoints for clients; also what the integration tests and the local pipeline run read."""
    from devstack import connect  # the topic names live with the connector config

    env = {
        "STACK_DIR": str(cfg.stack_dir),
        "STACK_PG_DSN": cfg.pg_dsn,
        "STACK_PG_URL": f"postgresql://engagement:engagement@127.0.0.1:{cfg.pg_port}/engagement",
        "STACK_KAFKA_BOOTSTRAP": cfg.kafka_bootstrap,
        "STACK_CONNECT_URL": f"http://127.0.0.1:{cfg.connect_port}",
        "STACK_CDC_TOPIC_EVENTS": connect.topic_for("public.engagement_events"),
        "STACK_CDC_TOPIC_CONTENT": connect.topic_for("public.content"),
        "STACK_CDC_SCHEMAS": str(connect.schemas_enabled()).lower(),
        "STACK_REDIS_URL": cfg.redis_url,
        "STACK_BQ_PROJECT": cfg.bq_project,
        "STACK_BQ_DATASET": cfg.bq_dataset,
        "STACK_BQ_REST_ENDPOINT": cfg.bq_rest_endpoint,
        "STACK_BQ_GRPC_ENDPOINT": cfg.bq_grpc_endpoint,
        "STACK_HTTP_API_URL": cfg.http_api_url,
        "STACK_HTTP_API_TOKEN": cfg.http_api_token,
    }
    if "STACK_PORT_OFFSET" in os.environ:
        env["STACK_PORT_OFFSET"] = os.environ["STACK_PORT_OFFSET"]
    env[INSTANCE_ENV] = instance()[0]
    return env


def _cmd_env(cfg: StackConfig, args: argparse.Namespace) -> int:
    for key, value in stack_env(cfg).items():
        print(f"export {key}={shlex.quote(value)}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scripts/stack",
        description="Local development stack (PostgreSQL, Kafka + Debezium, Redis, BigQuery emulator, HTTP API).",
        epilog="Environment: STACK_INSTANCE, STACK_DIR, STACK_PORT_OFFSET, ENGAGEMENT_CACHE_DIR, STACK_CDC_SCHEMAS; "
        "see docs/local-stack.md",
    )
    parser.add_argument(
        "--instance",
        choices=sorted(INSTANCES),
        help="which stack: dev (scripts/run-local's, the default), test (the test suite's) or bench (the "
        "benchmarks'); the same as STACK_INSTANCE",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="install, start and wait for the services (idempotent)")
    up.add_argument("services", nargs="*", help="only these services (and what they depend on)")
    up.add_argument(
        "--tables", action="store_true", help="also create the BigQuery tables and views in the default dataset"
    )
    up.set_defaults(handler=_cmd_up)
    down = commands.add_parser("down", help="stop the processes this stack started")
    down.add_argument("--purge", action="store_true", help="also delete the stack's data and logs (not the cache)")
    down.set_defaults(handler=_cmd_down)
    commands.add_parser("status", help="show which services are up").set_defaults(handler=_cmd_status)
    logs = commands.add_parser("logs", help="show the end of the logs")
    logs.add_argument("service", nargs="?", help="one service, or 'install' for install logs")
    logs.add_argument("-f", "--follow", action="store_true", help="keep following (Ctrl-C to stop)")
    logs.add_argument("-n", "--lines", type=int, default=50, help="lines per log (default 50)")
    logs.set_defaults(handler=_cmd_logs)
    commands.add_parser("env", help="print shell exports of the endpoints").set_defaults(handler=_cmd_env)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.instance:
        use_instance(args.instance)
    cfg = load_config()
    try:
        return args.handler(cfg, args)
    except StackError as exc:
        print(f"stack: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stack: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
