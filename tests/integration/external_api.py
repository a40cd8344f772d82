"""A client of the stack's stand-in external HTTP API (devstack/external_api.py) for tests: posting,
fault injection and what it stored."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import requests

from devstack.audit import receipt_counts
from devstack.config import StackConfig

TIMEOUT = 10


class ExternalApiClient:
    def __init__(self, cfg: StackConfig) -> None:
        self.url = cfg.http_api_url
        self.token = cfg.http_api_token
        self.session = requests.Session()

    def post_events(self, events: list[dict[str, Any]], key: str, token: str | None = None) -> requests.Response:
        return self.session.post(
            f"{self.url}/v1/events",
            json={"events": events},
            headers={"Authorization": f"Bearer {token or self.token}", "Idempotency-Key": key},
            timeout=TIMEOUT,
        )

    def set_faults(self, **faults: Any) -> None:
        """Replaces every injected fault; no arguments clears them."""
        self.session.post(f"{self.url}/admin/faults", json=faults, timeout=TIMEOUT).raise_for_status()

    def get(self, path: str) -> Any:
        response = self.session.get(f"{self.url}{path}", timeout=TIMEOUT)
        response.raise_for_status()
        return response.json()

    def receipts(self, ids: Iterable[Any]) -> dict[Any, int]:
        """How many times the API stored each of ``ids`` (0 if never)."""
        return receipt_counts(self.get("/v1/events/ids"), ids)

    def close(self) -> None:
        self.session.close()
