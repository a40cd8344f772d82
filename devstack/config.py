"""Where the local stack lives and which ports it listens on.

A checkout runs up to four instances of the stack side by side, chosen by ``STACK_INSTANCE``:

- ``dev`` (the default): what ``scripts/run-local`` and ``scripts/backfill`` use, in ``.stack``;
- ``test``: the test suite's own (``scripts/test`` and ``tests/conftest.py`` select it), in ``.stack-test``;
- ``bench``: the benchmarks' own, in ``.stack-bench``;
- ``faults``: ``scripts/faults``' own, whose services it kills and restarts, in ``.stack-faults``.

So a test or a benchmark never writes a row, a key or a request into the stack a person watches. Every value
can be overridden through an environment variable so two checkouts can run side by side (give the second one
its own ``STACK_DIR`` and ``STACK_PORT_OFFSET``; an instance adds its own offset to that one).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from transforms import artifacts

REPO_ROOT = Path(__file__).resolve().parent.parent
INSTANCE_ENV = "STACK_INSTANCE"


@dataclass(frozen=True)
class Instance:
    directory: str
    port_offset: int


INSTANCES = {
    "dev": Instance(".stack", 0),
    "test": Instance(".stack-test", 100),
    "bench": Instance(".stack-bench", 200),
    "faults": Instance(".stack-faults", 300),
}


def instance() -> tuple[str, Instance]:
    name = os.environ.get(INSTANCE_ENV, "dev") or "dev"
    if name not in INSTANCES:
        raise ValueError(f"{INSTANCE_ENV}={name!r}: expected one of {', '.join(INSTANCES)}")
    return name, INSTANCES[name]


def use_instance(name: str) -> None:
    """Selects a stack instance for this process and every process it starts.

    A ``STACK_DIR`` set for another instance names that instance's directory, so it is dropped.
    """
    if name not in INSTANCES:
        raise ValueError(f"unknown stack instance {name!r}: expected one of {', '.join(INSTANCES)}")
    if os.environ.get(INSTANCE_ENV, "dev") != name:
        os.environ.pop("STACK_DIR", None)
    os.environ[INSTANCE_ENV] = name


def _port(env_name: str, default: int) -> int:
    offset = int(os.environ.get("STACK_PORT_OFFSET", "0")) + instance()[1].port_offset
    return int(os.environ.get(env_name, default + offset))


@dataclass(frozen=True)
class StackConfig:
    """Paths and ports of one local stack instance."""

    stack_dir: Path
    pg_port: int
    kafka_port: int
    kafka_controller_port: int
    connect_port: int
    redis_port: int
    bq_rest_port: int
    bq_grpc_port: int
    http_api_port: int
    http_api_token: str
    bq_project: str
    bq_dataset: str

    @property
    def log_dir(self) -> Path:
        return self.stack_dir / "logs"

    @property
    def run_dir(self) -> Path:
        """PID files of the processes this stack started."""
        return self.stack_dir / "run"

    @property
    def data_dir(self) -> Path:
        return self.stack_dir / "data"

    @property
    def cache_dir(self) -> Path:
        """Downloaded artefacts (jars, virtualenvs); survives ``down``. The project's one cache root."""
        return artifacts.cache_root()

    # Endpoints, as clients use them.
    @property
    def pg_dsn(self) -> str:
        return f"host=127.0.0.1 port={self.pg_port} dbname=engagement user=engagement password=engagement"

    @property
    def kafka_bootstrap(self) -> str:
        return f"127.0.0.1:{self.kafka_port}"

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    @property
    def bq_rest_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.bq_rest_port}"

    @property
    def bq_grpc_endpoint(self) -> str:
        return f"127.0.0.1:{self.bq_grpc_port}"

    @property
    def http_api_url(self) -> str:
        return f"http://127.0.0.1:{self.http_api_port}"


EPHEMERAL_PORTS_START = 32768
"""Linux's default low end of ``net.ipv4.ip_local_port_range``. Every default port of every instance stays below
it, where the kernel never hands a port to an outgoing connection (docs/local-stack.md, "Ports")."""


def load_config() -> StackConfig:
    return StackConfig(
        stack_dir=Path(os.environ.get("STACK_DIR", REPO_ROOT / instance()[1].directory)).resolve(),
        pg_port=_port("STACK_PG_PORT", 25432),
        kafka_port=_port("STACK_KAFKA_PORT", 29092),
        kafka_controller_port=_port("STACK_KAFKA_CONTROLLER_PORT", 29093),
        connect_port=_port("STACK_CONNECT_PORT", 28083),
        redis_port=_port("STACK_REDIS_PORT", 26379),
        bq_rest_port=_port("STACK_BQ_REST_PORT", 29050),
        bq_grpc_port=_port("STACK_BQ_GRPC_PORT", 29060),
        http_api_port=_port("STACK_HTTP_API_PORT", 28080),
        http_api_token=os.environ.get("STACK_HTTP_API_TOKEN", "local-dev-token"),
        bq_project=os.environ.get("STACK_BQ_PROJECT", "local-project"),
        bq_dataset=os.environ.get("STACK_BQ_DATASET", "engagement"),
    )
