"""BigQuery emulator: ``local-bigquery`` from PyPI, serving the REST API and the Storage Read/Write gRPC API.

It runs from its own Python 3.13 virtualenv under ``cfg.cache_dir`` because it pins numpy, pyarrow and
protobuf versions that conflict with Beam's. Data lives in ``cfg.data_dir / "bigquery"`` and survives restarts.

Clients: see ``devstack.bigquery_clients``. The gRPC port speaks plaintext only, so Storage API clients need an
insecure channel; the REST endpoint is plain HTTP.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from devstack.config import StackConfig
from devstack.process import StackError, ensure_port_free, running_pid, spawn, wait_for_service
from devstack.process import stop as stop_process
from transforms import artifacts

NAME = "bigquery-emulator"

REQUIREMENTS = Path(__file__).with_name("requirements-bigquery-emulator.txt")
SERVE_SCRIPT = Path(__file__).with_name("bigquery_emulator_serve.py")
PYTHON_SERIES = (3, 13)
# Registered from the duckdb-extension-* wheels so DuckDB never tries to download them at run time.
DUCKDB_EXTENSIONS = ("ducklake", "icu", "spatial")
# Points at an interpreter to use instead of searching PATH and pyenv.
PYTHON_ENV_VAR = "STACK_BQ_PYTHON"

_INSTALLED_MARKER = ".devstack-installed"


def _root(cfg: StackConfig) -> Path:
    return artifacts.bigquery_emulator_dir()


def _home(cfg: StackConfig) -> Path:
    # DuckDB keeps installed extensions under $HOME/.duckdb and offers no other process-wide setting; giving the
    # emulator a HOME inside the cache keeps the stack self-contained and the user's ~/.duckdb untouched.
    return _root(cfg) / "home"


def _data_dir(cfg: StackConfig) -> Path:
    return cfg.data_dir / "bigquery"


def _venv_dir(cfg: StackConfig) -> Path:
    # Keyed by the pins so that editing the requirements file builds a fresh venv instead of patching one.
    # Venvs of older pins are left alone (another checkout sharing the cache may still run from one); delete
    # stale venv-* directories by hand to reclaim their ~600 MB each.
    digest = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()[:12]
    return _root(cfg) / f"venv-{digest}"


def _venv_bin(cfg: StackConfig, program: str) -> Path:
    return _venv_dir(cfg) / "bin" / program


# --- install -------------------------------------------------------------------------------------------------


def _interpreter_candidates() -> Iterator[Path]:
    override = os.environ.get(PYTHON_ENV_VAR)
    if override:
        yield Path(override)
        return
    series = "{}.{}".format(*PYTHON_SERIES)
    name = f"python{series}"
    on_path = shutil.which(name)
    if on_path:
        yield Path(on_path)
    pyenv_roots = [os.environ.get("PYENV_ROOT"), str(Path.home() / ".pyenv")]
    if on_path and Path(on_path).parent.name == "shims":
        # A pyenv shim only works with pyenv itself on PATH; the versions beside it work without.
        pyenv_roots.append(str(Path(on_path).parent.parent))
    pyenv = shutil.which("pyenv")
    if pyenv:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            result = subprocess.run([pyenv, "root"], capture_output=True, text=True, check=True, timeout=30)
            pyenv_roots.insert(0, result.stdout.strip())
    # Plain releases only: skips free-threaded ("3.13.0t") and dev builds.
    release = re.compile(rf"{re.escape(series)}\.\d+")
    for root in dict.fromkeys(r for r in pyenv_roots if r):
        versions = [p for p in Path(root, "versions").glob(f"{series}.*") if release.fullmatch(p.name)]
        # Newest patch release first.
        for version_dir in sorted(versions, key=lambda p: int(p.name.rsplit(".", 1)[1]), reverse=True):
            yield version_dir / "bin" / name


def _probe_interpreter(candidate: Path) -> Path | None:
    """The real executable behind ``candidate`` (it may be a pyenv shim) if it is a usable 3.13 with venv."""
    probe = "import sys, venv, ensurepip; print(sys.executable); print(sys.version_info[0], sys.version_info[1])"
    try:
        result = subprocess.run([str(candidate), "-c", probe], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = result.stdout.splitlines()
    if result.returncode != 0 or len(lines) != 2 or lines[1].split() != [str(n) for n in PYTHON_SERIES]:
        return None
    return Path(lines[0])


def find_python() -> Path:
    """A Python 3.13 interpreter with ``venv``/``ensurepip``: $STACK_BQ_PYTHON, then PATH, then pyenv."""
    tried = []
    for candidate in _interpreter_candidates():
        tried.append(str(candidate))
        found = _probe_interpreter(candidate)
        if found is not None:
            return found
    series = "{}.{}".format(*PYTHON_SERIES)
    raise StackError(
        f"the BigQuery emulator needs Python {series} (local-bigquery supports only {series}); "
        f"tried: {', '.join(tried) or 'nothing found'}. Install it (e.g. `pyenv install {series}`) "
        f"or point {PYTHON_ENV_VAR} at a python{series} that has the venv module."
    )


@contextlib.contextmanager
def _install_lock(cfg: StackConfig) -> Iterator[None]:
    # The CLI and a test session may both install at once; pip into the same venv concurrently corrupts it.
    _root(cfg).mkdir(parents=True, exist_ok=True)
    with open(_root(cfg) / ".install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _run(argv: list[str], what: str, env: dict[str, str] | None = None) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if result.returncode != 0:
        output = (result.stdout + result.stderr).strip().splitlines()
        raise StackError(f"{what} failed (exit {result.returncode}):\n" + "\n".join(output[-30:]))


def _extensions_registered(cfg: StackConfig) -> bool:
    registry = _home(cfg) / ".duckdb" / "extensions"
    return all(any(registry.glob(f"*/*/{name}.duckdb_extension")) for name in DUCKDB_EXTENSIONS)


def install(cfg: StackConfig) -> None:
    """Build the emulator's virtualenv from the pinned requirements (once) and register DuckDB's extensions."""
    with _install_lock(cfg):
        venv = _venv_dir(cfg)
        marker = venv / _INSTALLED_MARKER
        if not marker.exists():
            # A venv without the marker is a leftover of an interrupted install: start over.
            shutil.rmtree(venv, ignore_errors=True)
            python = find_python()
            _run([str(python), "-m", "venv", str(venv)], f"creating {venv}")
            _run(
                [
                    str(venv / "bin" / "python"),
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                    "--no-input",
                    # Every pin has a wheel; never fall back to compiling on a CI machine.
                    "--only-binary=:all:",
                    "--requirement",
                    str(REQUIREMENTS),
                ],
                "installing the BigQuery emulator's requirements",
            )
            # Written last: its presence means the venv is complete.
            marker.write_text(json.dumps({"python": str(python)}) + "\n")
        if not _extensions_registered(cfg):
            _home(cfg).mkdir(parents=True, exist_ok=True)
            script = "import sys, duckdb_extensions\nfor name in sys.argv[1:]: duckdb_extensions.import_extension(name)"
            _run(
                [str(venv / "bin" / "python"), "-c", script, *DUCKDB_EXTENSIONS],
                "registering DuckDB extensions",
                env={"HOME": str(_home(cfg))},
            )


# --- run -----------------------------------------------------------------------------------------------------


def start(cfg: StackConfig) -> None:
    if running_pid(cfg, NAME) is not None:
        return
    python = _venv_bin(cfg, "python")
    if not (_venv_dir(cfg) / _INSTALLED_MARKER).exists():
        raise StackError(f"{NAME} is not installed (expected {_venv_dir(cfg)}); run install first")
    for port in (cfg.bq_rest_port, cfg.bq_grpc_port):
        ensure_port_free(NAME, port)
    # `local-bigquery serve`, but its gRPC server drains when stopped (see the launcher's docstring).
    spawn(
        cfg,
        NAME,
        [
            str(python),
            str(SERVE_SCRIPT),
            "127.0.0.1",
            str(cfg.bq_rest_port),
            str(cfg.bq_grpc_port),
            cfg.bq_project,
            # The emulator creates this dataset at start-up, so the pipeline's dataset always exists.
            cfg.bq_dataset,
            str(_data_dir(cfg)),
        ],
        env={"HOME": str(_home(cfg))},
    )


def _rest_ready(cfg: StackConfig) -> bool:
    # Reading the dataset goes through the catalog in DuckDB, so a 200 means queries can run, not just that
    # the HTTP listener is up.
    url = f"{cfg.bq_rest_endpoint}/bigquery/v2/projects/{cfg.bq_project}/datasets/{cfg.bq_dataset}"
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - fixed loopback http URL
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _grpc_ready(cfg: StackConfig) -> bool:
    import grpc  # Only the stack's own venv needs grpc, not every importer of this module.

    with grpc.insecure_channel(cfg.bq_grpc_endpoint) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=2)
        except grpc.FutureTimeoutError:
            return False
    return True


def wait_ready(cfg: StackConfig, timeout: float) -> None:
    """Ready = the REST API can read the dataset and the Storage API's gRPC channel connects."""
    wait_for_service(
        cfg,
        NAME,
        lambda: _rest_ready(cfg) and _grpc_ready(cfg),
        f"BigQuery emulator on {cfg.bq_rest_endpoint} and {cfg.bq_grpc_endpoint}",
        timeout,
    )


def stop(cfg: StackConfig) -> None:
    stop_process(cfg, NAME)


def endpoint(cfg: StackConfig) -> str:
    return (
        f"{cfg.bq_rest_endpoint} (REST), {cfg.bq_grpc_endpoint} (Storage API, plaintext gRPC), "
        f"project {cfg.bq_project}, dataset {cfg.bq_dataset}"
    )
