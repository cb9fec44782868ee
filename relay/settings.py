"""The relay's settings, read from the environment (and CLI flags), validated at start-up.

Every bad value is one ``ConfigError`` line naming the variable. The write key is held in a
field excluded from ``repr`` and is never part of an error message.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any
from urllib.parse import urlsplit

from relay.client import GZIP_MIN_BYTES, REGION_URLS, mask_key
from relay.errors import ConfigError


@dataclass(frozen=True)
class Settings:
    database_url: str | None = None
    write_key: str | None = field(default=None, repr=False)
    region: str = "us"
    api_url: str | None = None
    batch_size: int = 100
    # Requests in flight at once per relay (batches that share no customer).
    concurrency: int = 4
    poll_interval_s: float = 1.0
    lease_s: float = 30.0
    http_timeout_s: float = 10.0
    max_age_s: float = 86400.0
    backoff_base_s: float = 1.0
    backoff_cap_s: float = 300.0
    retry_after_cap_s: float = 300.0
    instance: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    verify_tls: bool = True
    metrics_port: int | None = None
    # 127.0.0.1 keeps /metrics and the probes on the machine; 0.0.0.0 or :: (every address)
    # lets other containers and pods scrape them.
    metrics_host: str = "127.0.0.1"
    retention_days: float | None = None
    # The relay's own VACUUM of relay_outbox (0 turns it off): at most this often, and only
    # when at least vacuum_min_dead dead tuples wait and nothing vacuumed for that long.
    vacuum_interval_s: float = 5.0
    vacuum_min_dead: int = 5000
    # Customer.io allows 3000 requests per 3 s per workspace; this is the per-destination cap.
    rate_per_s: float = 1000.0
    # Request bodies of at least this many bytes of JSON go gzip-compressed; 0 turns it off.
    gzip_min_bytes: int = GZIP_MIN_BYTES

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{f.name}={getattr(self, f.name)!r}" for f in fields(self) if f.name != "write_key"
        )
        key = mask_key(self.write_key) if self.write_key else None
        return f"Settings({shown}, write_key={key!r})"

    @property
    def base_url(self) -> str:
        return (self.api_url or REGION_URLS[self.region]).rstrip("/")

    def with_overrides(self, **overrides: Any) -> Settings:
        clean = {k: v for k, v in overrides.items() if v is not None}
        return replace(self, **clean).validated()

    def validated(self) -> Settings:
        if self.region not in REGION_URLS:
            raise ConfigError(
                f"CUSTOMERIO_REGION={self.region!r} is not a region; use one of: "
                + ", ".join(sorted(REGION_URLS))
            )
        if self.api_url is not None:
            parts = urlsplit(self.api_url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ConfigError(
                    "CUSTOMERIO_API_URL must be an http(s) URL such as https://cdp.customer.io"
                )
        if self.database_url is not None:
            parts = urlsplit(self.database_url)
            if parts.scheme not in ("postgres", "postgresql"):
                raise ConfigError("DATABASE_URL must be a URL starting with postgresql://")
        if self.vacuum_interval_s < 0 or self.vacuum_min_dead < 0:
            raise ConfigError("RELAY_VACUUM_SECONDS and RELAY_VACUUM_MIN_DEAD must be >= 0")
        if not 1 <= self.concurrency <= 64:
            raise ConfigError("RELAY_CONCURRENCY must be between 1 and 64")
        if self.gzip_min_bytes < 0:
            raise ConfigError(
                f"RELAY_GZIP_MIN_BYTES must be 0 or more (0 or off: no compression), "
                f"got {self.gzip_min_bytes}"
            )
        if self.batch_size < 1:
            raise ConfigError("RELAY_BATCH_SIZE must be at least 1")
        if self.batch_size > 10_000:
            raise ConfigError("RELAY_BATCH_SIZE must be at most 10000")
        for name in (
            "poll_interval_s",
            "lease_s",
            "http_timeout_s",
            "max_age_s",
            "backoff_base_s",
            "backoff_cap_s",
            "retry_after_cap_s",
            "rate_per_s",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{_ENV_OF[name]} must be greater than 0")
        if self.metrics_port is not None and not 1 <= self.metrics_port <= 65535:
            raise ConfigError(
                "RELAY_METRICS_PORT (--metrics-port) must be between 1 and 65535, "
                f"got {self.metrics_port}"
            )
        _check_metrics_host(self.metrics_host)
        if self.lease_s <= self.http_timeout_s:
            raise ConfigError(
                "RELAY_LEASE_SECONDS must be longer than RELAY_HTTP_TIMEOUT, or a slow request "
                "would lose its lease while still in flight"
            )
        return self

    def require_write_key(self) -> str:
        if not self.write_key:
            raise ConfigError(
                "CUSTOMERIO_WRITE_KEY is not set (the Pipelines write key of the default "
                "destination; see README: Configuration)"
            )
        return self.write_key


def _check_metrics_host(host: str) -> None:
    """An address or host name to bind; whether it can be bound is known only by binding."""
    what = f"RELAY_METRICS_HOST (--metrics-host) {host!r}"
    if not host:
        raise ConfigError(f"{what} is empty: use 127.0.0.1, 0.0.0.0 (every address) or ::")
    if ":" in host or "[" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(
                f"{what} is not an address: give the host alone, without brackets, a port "
                "or a scheme (the port is RELAY_METRICS_PORT)"
            ) from None
        return
    if not _HOST_NAME.fullmatch(host):
        raise ConfigError(
            f"{what} is not an IP address or host name (letters, digits, '-' and '.')"
        )


_HOST_NAME = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?"
)


_ENV_OF = {
    "database_url": "DATABASE_URL",
    "write_key": "CUSTOMERIO_WRITE_KEY",
    "region": "CUSTOMERIO_REGION",
    "api_url": "CUSTOMERIO_API_URL",
    "batch_size": "RELAY_BATCH_SIZE",
    "concurrency": "RELAY_CONCURRENCY",
    "poll_interval_s": "RELAY_POLL_INTERVAL",
    "lease_s": "RELAY_LEASE_SECONDS",
    "http_timeout_s": "RELAY_HTTP_TIMEOUT",
    "max_age_s": "RELAY_MAX_AGE_SECONDS",
    "backoff_base_s": "RELAY_BACKOFF_BASE",
    "backoff_cap_s": "RELAY_BACKOFF_CAP",
    "retry_after_cap_s": "RELAY_RETRY_AFTER_CAP",
    "instance": "RELAY_INSTANCE",
    "verify_tls": "RELAY_INSECURE_SKIP_TLS_VERIFY",
    "metrics_port": "RELAY_METRICS_PORT",
    "metrics_host": "RELAY_METRICS_HOST",
    "retention_days": "RELAY_RETENTION_DAYS",
    "vacuum_interval_s": "RELAY_VACUUM_SECONDS",
    "vacuum_min_dead": "RELAY_VACUUM_MIN_DEAD",
    "rate_per_s": "RELAY_RATE_PER_SECOND",
    "gzip_min_bytes": "RELAY_GZIP_MIN_BYTES",
}


def from_env(env: Mapping[str, str] | None = None) -> Settings:
    """Settings from environment variables (see README: Configuration)."""
    env = os.environ if env is None else env
    if (env.get("RELAY_MAX_ATTEMPTS") or "").strip():
        # Removed: a count of transient failures said nothing about the message, and made
        # messages dead minutes into an outage. Only the age limit ends retries now.
        logging.getLogger("relay").warning(
            "RELAY_MAX_ATTEMPTS is ignored: transient failures are retried until "
            "RELAY_MAX_AGE_SECONDS"
        )
    values: dict[str, Any] = {}
    types = {f.name: f.type for f in fields(Settings)}
    for name, var in _ENV_OF.items():
        raw = env.get(var)
        if raw is None or raw.strip() == "":
            continue
        raw = raw.strip()
        if name == "verify_tls":
            if raw.lower() not in ("1", "true", "yes", "0", "false", "no"):
                raise ConfigError(f"{var} must be 1 or 0")
            values[name] = raw.lower() not in ("1", "true", "yes")
            continue
        if name == "gzip_min_bytes" and raw.lower() == "off":
            values[name] = 0
            continue
        kind = str(types[name])
        try:
            if kind.startswith("int"):
                values[name] = int(raw)
            elif kind.startswith("float"):
                values[name] = float(raw)
            else:
                values[name] = raw.lower() if name == "region" else raw
        except ValueError:
            what = "a whole number" if kind.startswith("int") else "a number"
            if name == "gzip_min_bytes":
                what += ' or "off"'
            raise ConfigError(f"{var} must be {what}, got {raw!r}") from None
    return Settings(**values).validated()
