"""Where each message goes: the default destination (from the environment) and the table's.

A message's ``project_id`` picks its destination row; a project with no row goes to the default
destination (``CUSTOMERIO_WRITE_KEY``). A message whose destination is missing, disabled or
paused is *held* (a visible state, never dropped) and released once the destination is usable.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from relay.client import REGION_URLS, CustomerIOClient, Destination, sends_key_in_clear
from relay.errors import ConfigError
from relay.ratelimit import RateLimiter

DEFAULT = "default"


@dataclass(frozen=True)
class Route:
    """The destination for one project, or why there is none (``reason``)."""

    destination: Destination | None
    reason: str | None
    # The key a 401 would pause: the table row's project id, or DEFAULT.
    pause_key: str


@dataclass(frozen=True)
class DestinationRow:
    project_id: str
    region: str
    api_url: str | None
    write_key: str
    enabled: bool
    paused_reason: str | None


class Router:
    """Resolves projects to destinations and owns one HTTP client and rate limiter per destination.

    ``rows`` is refreshed by the daemon from ``relay_destination``; a paused default destination
    is remembered in memory (its key lives in the environment, so fixing it means a restart).
    """

    def __init__(
        self,
        default: Destination | None,
        *,
        client_factory: Callable[[Destination], CustomerIOClient],
        limiter_factory: Callable[[], RateLimiter],
        allow_insecure_http: bool = False,
    ) -> None:
        self._default = default
        self._allow_insecure_http = allow_insecure_http
        self._default_paused: str | None = None
        self._rows: dict[str, DestinationRow] = {}
        self._client_factory = client_factory
        self._limiter_factory = limiter_factory
        self._clients: dict[tuple[str, str], tuple[CustomerIOClient, RateLimiter]] = {}
        self._lock = threading.Lock()

    def refresh(self, rows: Sequence[Sequence[Any]]) -> None:
        """Rows of DESTINATION_LIST_WITH_KEY: project_id, region, api_url, enabled, paused_at,
        paused_reason, updated_at, write_key."""
        table = {
            r[0]: DestinationRow(r[0], r[1], r[2], r[7], bool(r[3]), r[5] if r[4] else None)
            for r in rows
        }
        with self._lock:
            self._rows = table

    def route(self, project_id: str | None) -> Route:
        with self._lock:
            row = self._rows.get(project_id) if project_id is not None else None
            if row is not None:
                if not row.enabled:
                    return Route(None, f"destination {row.project_id} is disabled", row.project_id)
                if row.paused_reason:
                    return Route(
                        None,
                        f"destination {row.project_id} is paused: {row.paused_reason}",
                        row.project_id,
                    )
                base = (row.api_url or REGION_URLS[row.region]).rstrip("/")
                if sends_key_in_clear(base) and not self._allow_insecure_http:
                    # The same rule as CUSTOMERIO_API_URL at start-up: a row changed later
                    # (by whoever may write relay_destination) must not send the key in clear.
                    return Route(
                        None,
                        f"destination {row.project_id}: {base} is plain http:// to another "
                        "host and would send the write key unencrypted (use https://, or set "
                        "RELAY_ALLOW_INSECURE_HTTP=1 for a stand-in on a network you trust)",
                        row.project_id,
                    )
                try:
                    dest = Destination(row.project_id, base, row.write_key)
                except ConfigError as exc:
                    # A malformed row holds its own messages; it never stops the relay.
                    return Route(None, f"destination {row.project_id}: {exc}", row.project_id)
                return Route(dest, None, row.project_id)
            if self._default is None:
                return Route(None, f"no destination configured for project {project_id}", DEFAULT)
            if self._default_paused:
                return Route(
                    None, f"default destination is paused: {self._default_paused}", DEFAULT
                )
            return Route(self._default, None, DEFAULT)

    def pause_default(self, reason: str) -> None:
        with self._lock:
            self._default_paused = reason

    @property
    def paused(self) -> list[str]:
        """Names of destinations paused for a bad key (for health checks)."""
        with self._lock:
            names = [r.project_id for r in self._rows.values() if r.paused_reason]
            if self._default_paused:
                names.append(DEFAULT)
            return names

    def release_params(self) -> dict[str, Any]:
        """Parameters for OUTBOX_RELEASE_HELD: which held rows can go back to the queue."""
        with self._lock:
            routable = [
                r.project_id for r in self._rows.values() if r.enabled and not r.paused_reason
            ]
            return {
                "routable": routable,
                "configured": list(self._rows),
                "default_ok": self._default is not None and not self._default_paused,
            }

    def client(self, destination: Destination) -> tuple[CustomerIOClient, RateLimiter]:
        key = (destination.base_url, destination.write_key)
        with self._lock:
            pair = self._clients.get(key)
            if pair is None:
                pair = (self._client_factory(destination), self._limiter_factory())
                self._clients[key] = pair
            return pair

    def close(self) -> None:
        with self._lock:
            for client, _ in self._clients.values():
                client.close()
            self._clients.clear()
