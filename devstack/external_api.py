"""Stand-in for the external HTTP API that the pipeline's HTTP sink posts event batches to.

It behaves like a well-run third-party ingestion API (bearer token, idempotency keys) and lets tests inject
the failures a real one has (5xx, 429 with Retry-After, slow responses, outages), while recording exactly
what it stored so tests can assert "every event id exactly once".

API (JSON everywhere):

* ``POST /v1/events`` with ``{"events": [{"id": ..., ...}, ...]}``, ``Authorization: Bearer <token>`` and
  ``Idempotency-Key``. 200 ``{"accepted": n}``; a repeated key with the same body replays the first response
  (``"replayed": true`` and header ``Idempotent-Replayed: true``) and stores nothing; a repeated key with a
  different body is 422. 400 for a missing key or a malformed body, 401 for a bad token, 413 for >16 MiB.
  Only successful responses are remembered, so a retry after a failure is processed afresh.
* ``GET /v1/stats``, ``GET /v1/events?limit=N`` (most recent stored events, newest last),
  ``GET /v1/events/ids`` (distinct stored ids in first-receipt order, plus ids received more than once),
  ``GET /healthz``.
* ``POST /admin/faults`` replaces the fault settings (omitted fields go back to "no fault"):
  ``error_rate`` (0..1), ``error_status`` (400, 429, 500, 502, 503, 504; default 503), ``retry_after``
  (seconds, sent as Retry-After), ``latency_ms``, ``outage_seconds`` (every ingest fails with 503 for that long,
  counted from now), ``seed`` (makes ``error_rate`` reproducible). ``GET /admin/faults`` shows them;
  ``POST /admin/reset`` clears data and faults.

Faults and latency apply to ``POST /v1/events`` only: the introspection and admin endpoints stay fast and
reliable so tests can observe the failures they inject. Those endpoints need no token; the server listens on
loopback only. State is in memory; with ``--state-dir`` the final stats and ids are written there on shutdown.

Run: ``python -m devstack.external_api --port 28080 [--token T | $STACK_HTTP_API_TOKEN] [--state-dir DIR]``.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import logging
import os
import random
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter, deque
from dataclasses import asdict, dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import parse_qs, urlsplit

from devstack.config import REPO_ROOT, StackConfig
from devstack.process import ensure_port_free, running_pid, spawn, wait_for_service
from devstack.process import stop as stop_process

NAME = "external-api"
TOKEN_ENV_VAR = "STACK_HTTP_API_TOKEN"  # noqa: S105 - the name of a variable, not a secret

MAX_BODY_BYTES = 16 * 1024 * 1024
RECENT_EVENTS_KEPT = 10_000
DEFAULT_EVENTS_LIMIT = 100
INJECTABLE_STATUSES = frozenset({400, 429, 500, 502, 503, 504})

_log = logging.getLogger("devstack.external_api")  # __name__ is __main__ when run as a script


class BadRequestError(Exception):
    """The request is malformed; the message is returned to the client."""


@dataclass(frozen=True)
class Faults:
    error_rate: float = 0.0
    error_status: int = 503
    retry_after: float | None = None
    latency_ms: float = 0.0
    # time.monotonic() until which every ingest request fails; 0 = no outage.
    outage_until: float = 0.0
    seed: int | None = None

    @classmethod
    def parse(cls, body: Any) -> Faults:
        if not isinstance(body, dict):
            raise BadRequestError("fault settings must be a JSON object")
        unknown = set(body) - {"error_rate", "error_status", "retry_after", "latency_ms", "outage_seconds", "seed"}
        if unknown:
            raise BadRequestError(f"unknown fault settings: {sorted(unknown)}")
        error_rate = _number(body, "error_rate", 0.0)
        if not 0.0 <= error_rate <= 1.0:
            raise BadRequestError("error_rate must be between 0 and 1")
        error_status = body.get("error_status", 503)
        if (
            not isinstance(error_status, int)
            or isinstance(error_status, bool)
            or error_status not in INJECTABLE_STATUSES
        ):
            raise BadRequestError(f"error_status must be one of {sorted(INJECTABLE_STATUSES)}")
        retry_after = _number(body, "retry_after", None)
        latency_ms = _number(body, "latency_ms", 0.0)
        outage_seconds = _number(body, "outage_seconds", 0.0)
        seed = body.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise BadRequestError("seed must be an integer")
        return cls(
            error_rate=error_rate,
            error_status=error_status,
            retry_after=retry_after,
            latency_ms=latency_ms,
            outage_until=time.monotonic() + outage_seconds if outage_seconds > 0 else 0.0,
            seed=seed,
        )

    def describe(self) -> dict[str, Any]:
        described = asdict(self)
        del described["outage_until"]
        described["outage_remaining_s"] = round(max(0.0, self.outage_until - time.monotonic()), 3)
        return described


def _number(body: dict[str, Any], key: str, default: float | None) -> Any:
    value = body.get(key, default)
    if value is default:
        return value
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
        raise BadRequestError(f"{key} must be a non-negative number")
    return float(value)


@dataclass(frozen=True)
class Outcome:
    status: int
    body: dict[str, Any]
    headers: tuple[tuple[str, str], ...] = ()


class EventStore:
    """Everything the API has accepted, plus the fault settings; safe to use from many handler threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self._responses: dict[str, tuple[str, Outcome]] = {}  # key -> (body digest, first response)
            self._recent: deque[dict[str, Any]] = deque(maxlen=RECENT_EVENTS_KEPT)
            # Keyed by the id exactly as sent, so 7 and "7" stay distinct (a type change is a sink bug too).
            self._receipts: Counter[int | str] = Counter()
            self._batches_received = 0
            self._batches_replayed = 0
            self._key_conflicts = 0
            self._events_stored = 0
            self._failures_injected = 0
            self._faults = Faults()
            self._random = random.Random()

    # --- faults ---

    def set_faults(self, faults: Faults) -> None:
        with self._lock:
            self._faults = faults
            self._random = random.Random(faults.seed)

    def faults(self) -> Faults:
        with self._lock:
            return self._faults

    def injected_failure(self) -> Outcome | None:
        """The failure to answer this ingest request with, if the fault settings call for one."""
        with self._lock:
            faults = self._faults
            if faults.outage_until > time.monotonic():
                outcome = Outcome(HTTPStatus.SERVICE_UNAVAILABLE, {"error": "outage (injected)"})
            elif faults.error_rate > 0 and self._random.random() < faults.error_rate:
                headers = ()
                if faults.retry_after is not None:
                    # Retry-After takes whole seconds; round up so clients never retry early.
                    headers = (("Retry-After", str(int(-(-faults.retry_after // 1)))),)
                outcome = Outcome(faults.error_status, {"error": "failure (injected)"}, headers)
            else:
                return None
            self._failures_injected += 1
            return outcome

    # --- data ---

    def ingest(self, key: str, events: list[dict[str, Any]], digest: str) -> Outcome:
        with self._lock:
            previous = self._responses.get(key)
            if previous is not None:
                first_digest, first = previous
                if first_digest != digest:
                    self._key_conflicts += 1
                    return Outcome(
                        HTTPStatus.UNPROCESSABLE_ENTITY,
                        {"error": "Idempotency-Key was already used with a different body"},
                    )
                self._batches_replayed += 1
                return Outcome(first.status, {**first.body, "replayed": True}, (("Idempotent-Replayed", "true"),))
            self._batches_received += 1
            self._events_stored += len(events)
            self._recent.extend(events)
            self._receipts.update(event["id"] for event in events)
            outcome = Outcome(HTTPStatus.OK, {"accepted": len(events)})
            self._responses[key] = (digest, outcome)
            return outcome

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "batches_received": self._batches_received,
                "batches_replayed": self._batches_replayed,
                "key_conflicts": self._key_conflicts,
                "events_stored": self._events_stored,
                "distinct_event_ids": len(self._receipts),
                "duplicate_event_ids": sum(1 for count in self._receipts.values() if count > 1),
                "failures_injected": self._failures_injected,
            }

    def recent_events(self, limit: int) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._recent)[-limit:] if limit > 0 else []

    def event_ids(self) -> dict[str, Any]:
        with self._lock:
            return {
                "ids": list(self._receipts),
                "duplicates": [{"id": i, "count": n} for i, n in self._receipts.items() if n > 1],
            }


def parse_events(raw: bytes) -> list[dict[str, Any]]:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BadRequestError(f"body is not valid JSON: {error}") from None
    if not isinstance(body, dict) or not isinstance(body.get("events"), list) or not body["events"]:
        raise BadRequestError('body must be {"events": [...]} with at least one event')
    for index, event in enumerate(body["events"]):
        if not isinstance(event, dict):
            raise BadRequestError(f"events[{index}] is not an object")
        event_id = event.get("id")
        if not isinstance(event_id, (int, str)) or isinstance(event_id, bool) or event_id == "":
            raise BadRequestError(f"events[{index}].id must be a non-empty string or an integer")
    return body["events"]


def body_digest(events: list[dict[str, Any]]) -> str:
    # Compare content, not bytes: a retry that re-serialises the same batch must still count as the same body.
    canonical = json.dumps(events, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


class Handler(BaseHTTPRequestHandler):
    # Keep-alive, as HTTP client sessions in the sink expect; every response sets Content-Length.
    protocol_version = "HTTP/1.1"
    server: ApiServer

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        store = self.server.store
        if url.path == "/healthz":
            self._reply(Outcome(HTTPStatus.OK, {"status": "ok"}))
        elif url.path == "/v1/stats":
            self._reply(Outcome(HTTPStatus.OK, store.stats()))
        elif url.path == "/v1/events":
            try:
                limit = int(parse_qs(url.query).get("limit", [DEFAULT_EVENTS_LIMIT])[0])
            except ValueError:
                self._reply(Outcome(HTTPStatus.BAD_REQUEST, {"error": "limit must be an integer"}))
                return
            self._reply(Outcome(HTTPStatus.OK, {"events": store.recent_events(limit)}))
        elif url.path == "/v1/events/ids":
            self._reply(Outcome(HTTPStatus.OK, store.event_ids()))
        elif url.path == "/admin/faults":
            self._reply(Outcome(HTTPStatus.OK, store.faults().describe()))
        else:
            self._reply(Outcome(HTTPStatus.NOT_FOUND, {"error": f"no such resource: {url.path}"}))

    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        raw = self._read_body()
        if raw is None:
            return
        try:
            if path == "/v1/events":
                self._reply(self._ingest(raw))
            elif path == "/admin/faults":
                faults = Faults.parse(json.loads(raw or b"{}"))
                self.server.store.set_faults(faults)
                _log.info("faults set: %s", faults.describe())
                self._reply(Outcome(HTTPStatus.OK, faults.describe()))
            elif path == "/admin/reset":
                self.server.store.reset()
                _log.info("data and faults reset")
                self._reply(Outcome(HTTPStatus.OK, {"reset": True}))
            else:
                self._reply(Outcome(HTTPStatus.NOT_FOUND, {"error": f"no such resource: {path}"}))
        except ValueError as error:  # JSONDecodeError, or bytes that are not UTF-8
            self._reply(Outcome(HTTPStatus.BAD_REQUEST, {"error": f"body is not valid JSON: {error}"}))
        except BadRequestError as error:
            self._reply(Outcome(HTTPStatus.BAD_REQUEST, {"error": str(error)}))

    def _ingest(self, raw: bytes) -> Outcome:
        store = self.server.store
        faults = store.faults()
        if faults.latency_ms > 0:
            time.sleep(faults.latency_ms / 1000)
        # Failures come before authentication, like a load balancer in front of the real service.
        failure = store.injected_failure()
        if failure is not None:
            return failure
        if not self._authorized():
            return Outcome(
                HTTPStatus.UNAUTHORIZED, {"error": "missing or invalid bearer token"}, (("WWW-Authenticate", "Bearer"),)
            )
        key = (self.headers.get("Idempotency-Key") or "").strip()
        if not key:
            raise BadRequestError("Idempotency-Key header is required")
        events = parse_events(raw)
        return store.ingest(key, events, body_digest(events))

    def _authorized(self) -> bool:
        scheme, _, presented = (self.headers.get("Authorization") or "").partition(" ")
        # Constant-time comparison, so response timing does not leak the token.
        expected = self.server.token.encode()
        return scheme.lower() == "bearer" and hmac.compare_digest(presented.strip().encode(), expected)

    def _read_body(self) -> bytes | None:
        """The request body, or None after answering a request whose body cannot be read."""
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0 or length > MAX_BODY_BYTES:
            # The unread body would be parsed as the next request: drop the connection after answering.
            self.close_connection = True
            status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE if length > 0 else HTTPStatus.BAD_REQUEST
            self._reply(Outcome(status, {"error": "missing, invalid or too large Content-Length"}))
            return None
        return self.rfile.read(length)

    def _reply(self, outcome: Outcome) -> None:
        payload = json.dumps(outcome.body).encode()
        self.send_response(outcome.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        for name, value in outcome.headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        # The default writes the request line only (no headers), so the bearer token never reaches the log.
        _log.info("%s %s", self.address_string(), format % args)


class ApiServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], token: str) -> None:
        super().__init__(address, Handler)
        self.token = token
        self.store = EventStore()


def serve(host: str, port: int, token: str, state_dir: Path | None) -> None:
    server = ApiServer((host, port), token)

    def shut_down(signum: int, _frame: FrameType | None) -> None:
        _log.info("signal %d: shutting down", signum)
        # shutdown() waits for serve_forever() to return, which runs on this (the main) thread.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, shut_down)
    signal.signal(signal.SIGINT, shut_down)
    _log.info("listening on http://%s:%d", host, server.server_address[1])
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
        if state_dir is not None:
            state_dir.mkdir(parents=True, exist_ok=True)
            final = {"stats": server.store.stats(), **server.store.event_ids()}
            (state_dir / "final-state.json").write_text(json.dumps(final, indent=1) + "\n")
        _log.info("stopped")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m devstack.external_api", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--token", default=os.environ.get(TOKEN_ENV_VAR), help=f"default: ${TOKEN_ENV_VAR}")
    parser.add_argument("--state-dir", type=Path, help="where to write final-state.json on shutdown")
    args = parser.parse_args(argv)
    if not args.token:
        parser.error(f"a token is required (--token or ${TOKEN_ENV_VAR})")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    serve(args.host, args.port, args.token, args.state_dir)


# --- devstack service interface --------------------------------------------------------------------------


def install(cfg: StackConfig) -> None:
    """Nothing to install: the server is standard-library Python."""


def start(cfg: StackConfig) -> None:
    if running_pid(cfg, NAME) is not None:
        return
    ensure_port_free(NAME, cfg.http_api_port)
    spawn(
        cfg,
        NAME,
        [
            sys.executable,
            "-m",
            "devstack.external_api",
            "--port",
            str(cfg.http_api_port),
            "--state-dir",
            str(cfg.data_dir / NAME),
        ],
        # Through the environment rather than argv, so the token does not show up in `ps`.
        env={TOKEN_ENV_VAR: cfg.http_api_token},
        cwd=REPO_ROOT,
    )


def _healthy(cfg: StackConfig) -> bool:
    try:
        with urllib.request.urlopen(f"{cfg.http_api_url}/healthz", timeout=2) as response:  # noqa: S310 - loopback
            return response.status == 200 and json.load(response).get("status") == "ok"
    except (urllib.error.URLError, OSError, ValueError):
        return False


def wait_ready(cfg: StackConfig, timeout: float) -> None:
    wait_for_service(cfg, NAME, lambda: _healthy(cfg), f"external HTTP API on {cfg.http_api_url}", timeout)


def stop(cfg: StackConfig) -> None:
    stop_process(cfg, NAME)


def endpoint(cfg: StackConfig) -> str:
    return f"{cfg.http_api_url} (POST /v1/events; GET /v1/stats, /v1/events/ids; POST /admin/faults)"


if __name__ == "__main__":
    main()
