"""The relay's settings, read from the environment (and CLI flags), validated at start-up.

Every bad value is one ``ConfigError`` line naming the variable (and its flag, if it has one).
Every number must be finite and within its entry of ``BOUNDS``: a NaN lease or an infinite
rate would otherwise pass every comparison and fail much later, mid-delivery.

Secrets (``SECRETS``) may instead be read from a file named by ``<NAME>_FILE``, the container
convention for mounted secrets: one trailing newline is stripped, setting both is an error, and
an error about the file names the variable and the path, never what the file holds. The write
key is held in a field excluded from ``repr`` and is never part of an error message.
"""

from __future__ import annotations

import difflib
import ipaddress
import logging
import math
import os
import re
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from relay.client import GZIP_MIN_BYTES, REGION_URLS, mask_key, sends_key_in_clear
from relay.errors import ConfigError

log = logging.getLogger("relay")


@dataclass(frozen=True)
class Settings:
    database_url: str | None = None
    write_key: str | None = field(default=None, repr=False)
    region: str = "us"
    api_url: str | None = None
    batch_size: int = 100
    # Requests in flight at once per relay (batches that share no customer).
    concurrency: int = 4
    # Claims whose chains may be in flight at once (1: the next claim waits for the last one's
    # outcome). They share the `concurrency` sending threads; see relay.service.DeliveryLoop.
    claims_in_flight: int = 2
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
    # Plain http:// to a host other than this machine sends the write key readable to anyone
    # on the path; refused unless set (a stand-in on a trusted network, as in compose.yaml).
    allow_insecure_http: bool = False

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
            _check_api_url(self.api_url, self.allow_insecure_http)
        if self.database_url is not None:
            from relay.db import check_dsn

            check_dsn(self.database_url)
        for name in BOUNDS:
            value = getattr(self, name)
            if value is not None:
                check_number(_named(name), value, *BOUNDS[name])
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
                "destination; see docs/configuration.md)"
            )
        return self.write_key


def _check_api_url(url: str, allow_insecure_http: bool) -> None:
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:  # an unclosed IPv6 bracket, a port that is not a number
        host = None
    if parts.scheme not in ("http", "https") or not host:
        raise ConfigError(
            "CUSTOMERIO_API_URL must be an http(s) URL such as https://cdp.customer.io"
        )
    if sends_key_in_clear(url) and not allow_insecure_http:
        raise ConfigError(
            f"CUSTOMERIO_API_URL {url} is plain HTTP to a host other than this machine: the "
            "write key would cross the network readable. Use https://, or set "
            "RELAY_ALLOW_INSECURE_HTTP=1 for a stand-in on a network you trust"
        )


def insecure_http_allowed(env: Mapping[str, str] | None = None) -> bool:
    """``RELAY_ALLOW_INSECURE_HTTP`` as a boolean (unset: False)."""
    env = os.environ if env is None else env
    raw = (env.get("RELAY_ALLOW_INSECURE_HTTP") or "").strip()
    return bool(raw) and _boolean("RELAY_ALLOW_INSECURE_HTTP", raw)


def _boolean(var: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value not in _TRUE + _FALSE:
        raise ConfigError(f"{var} must be 1 or 0, got {raw!r}")
    return value in _TRUE


_TRUE: Final = ("1", "true", "yes", "on")
_FALSE: Final = ("0", "false", "no", "off")


def check_number(
    what: str,
    value: float,
    low: float,
    high: float,
    low_included: bool,
    *,
    shown: str | None = None,
) -> None:
    """``value`` is finite and within [low, high] (or (low, high]), else one ``ConfigError``
    line: ``what`` names the setting (``RELAY_X`` or ``RELAY_X (--flag)``), ``shown`` is the
    value as written, when there is a text to quote."""
    above = value >= low if low_included else value > low
    if math.isfinite(value) and above and value <= high:
        return
    if low_included:
        bounds = f"between {low:g} and {high:g}"
    else:
        bounds = f"greater than {low:g} and at most {high:g}"
    raise ConfigError(f"{what} must be {bounds}, got {shown or repr(value)}")


def _named(name: str) -> str:
    flag = _FLAG_OF.get(name)
    return f"{_ENV_OF[name]} ({flag})" if flag else _ENV_OF[name]


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


# Every numeric setting: (lowest, highest, whether the lowest is allowed). The upper bounds are
# far beyond any sensible value; they exist so that a typo (an extra three zeros) or an
# overflow ("1e400" is infinity) is refused at start-up instead of stalling delivery.
_DAY: Final = 86400.0
BOUNDS: Final[Mapping[str, tuple[float, float, bool]]] = {
    "batch_size": (1, 10_000, True),
    "concurrency": (1, 64, True),
    "claims_in_flight": (1, 16, True),
    "poll_interval_s": (0, 3600, False),
    "lease_s": (0, _DAY, False),
    "http_timeout_s": (0, 3600, False),
    "max_age_s": (0, 365 * _DAY, False),
    "backoff_base_s": (0, _DAY, False),
    "backoff_cap_s": (0, _DAY, False),
    "retry_after_cap_s": (0, _DAY, False),
    "rate_per_s": (0, 1_000_000, False),
    "metrics_port": (1, 65535, True),
    "retention_days": (0, 36_500, True),  # 0: off, as when unset
    "vacuum_interval_s": (0, _DAY, True),  # 0: off
    "vacuum_min_dead": (0, 1_000_000_000, True),
    "gzip_min_bytes": (0, 100_000_000, True),  # 0: off
}

# Settings that may come from a file: <NAME>_FILE holds the value (see the module docstring).
SECRETS: Final = ("DATABASE_URL", "CUSTOMERIO_WRITE_KEY", "CUSTOMERIO_WRITE_KEY_NEW")

_FLAG_OF: Final = {
    "batch_size": "--batch-size",
    "concurrency": "--concurrency",
    "poll_interval_s": "--poll-interval",
    "lease_s": "--lease",
    "metrics_port": "--metrics-port",
    "metrics_host": "--metrics-host",
    "instance": "--instance",
}

_ENV_OF = {
    "database_url": "DATABASE_URL",
    "write_key": "CUSTOMERIO_WRITE_KEY",
    "region": "CUSTOMERIO_REGION",
    "api_url": "CUSTOMERIO_API_URL",
    "batch_size": "RELAY_BATCH_SIZE",
    "concurrency": "RELAY_CONCURRENCY",
    "claims_in_flight": "RELAY_CLAIMS_IN_FLIGHT",
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
    "allow_insecure_http": "RELAY_ALLOW_INSECURE_HTTP",
}

# RELAY_* variables read outside Settings: by the command line (relay.cli), the embedded
# server (relay.embedded), and the test suite (tests/), which runs relays in its own
# environment. RELAY_MAX_ATTEMPTS was removed and has its own warning.
OTHER_VARIABLES: Final = frozenset(
    {
        "RELAY_LOG_LEVEL",
        "RELAY_LOG_FORMAT",
        "RELAY_DATA_DIR",
        "RELAY_MAX_ATTEMPTS",
        "RELAY_TEST_DSN",
        "RELAY_FUZZ_EXAMPLES",
        "RELAY_CHAOS_SEED",
        "RELAY_MACHINE_EXAMPLES",
    }
)


def known_variables() -> frozenset[str]:
    names = set(_ENV_OF.values()) | OTHER_VARIABLES
    return frozenset(names | {f"{n}_FILE" for n in SECRETS})


def unknown_variables(names: Iterable[str]) -> list[tuple[str, str | None]]:
    """Each ``RELAY_*`` name the relay does not read, with the closest one it does (or None).

    Only names are looked at, never values (an environment may hold secrets of others).
    """
    known = sorted(n for n in known_variables() if n.startswith("RELAY_"))
    out = []
    for name in sorted(names):
        if name.startswith("RELAY_") and name not in known:
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
            out.append((name, close[0] if close else None))
    return out


def warn_unknown_variables(env: Mapping[str, str] | None = None) -> None:
    """One WARNING line per ``RELAY_*`` variable the relay ignores (a typo, most likely)."""
    env = os.environ if env is None else env
    # Iterating a mapping yields its keys only: no value is read.
    for name, closest in unknown_variables(list(env)):
        hint = f" (did you mean {closest}?)" if closest else ""
        log.warning(
            "%s is not a setting of the relay and is ignored%s",
            name,
            hint,
            extra={"variable": name, "suggestion": closest},
        )


def read_secret(env: Mapping[str, str], var: str) -> str | None:
    """``var`` from ``env``, or the content of the file ``<var>_FILE`` names (None if neither).

    The file's one trailing newline is dropped (secret stores and ``echo`` add one); anything
    else is kept, so a stray space still fails where the value is checked. A message about the
    file names it but never quotes it: it may be the secret's first bytes.
    """
    file_var = f"{var}_FILE"
    value = (env.get(var) or "").strip()
    path = (env.get(file_var) or "").strip()
    if value and path:
        raise ConfigError(f"{var} and {file_var} are both set: set one of them")
    if not path:
        return value or None
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{file_var}: cannot read {path}: {exc.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{file_var}: {path} is not UTF-8 text") from None
    text = text.removesuffix("\n").removesuffix("\r")
    if not text.strip():
        raise ConfigError(f"{file_var}: {path} is empty")
    return text


def database_url(env: Mapping[str, str] | None = None) -> str | None:
    """``DATABASE_URL`` (or the file ``DATABASE_URL_FILE`` names), checked; None when unset.

    Its password is registered with ``relay.logs``, so no log line or error shows it.
    """
    from relay import logs
    from relay.db import check_dsn, dsn_password

    env = os.environ if env is None else env
    url = read_secret(env, "DATABASE_URL")
    if url is None:
        return None
    logs.register_secret(dsn_password(url))
    return check_dsn(url)


def from_env(env: Mapping[str, str] | None = None) -> Settings:
    """Settings from environment variables (see docs/configuration.md)."""
    env = os.environ if env is None else env
    if (env.get("RELAY_MAX_ATTEMPTS") or "").strip():
        # Removed: a count of transient failures said nothing about the message, and made
        # messages dead minutes into an outage. Only the age limit ends retries now.
        log.warning(
            "RELAY_MAX_ATTEMPTS is ignored: transient failures are retried until "
            "RELAY_MAX_AGE_SECONDS",
            extra={"variable": "RELAY_MAX_ATTEMPTS"},
        )
    values: dict[str, Any] = {}
    types = {f.name: f.type for f in fields(Settings)}
    for name, var in _ENV_OF.items():
        if var in SECRETS:
            values[name] = database_url(env) if var == "DATABASE_URL" else read_secret(env, var)
            continue
        raw = env.get(var)
        if raw is None or raw.strip() == "":
            continue
        raw = raw.strip()
        if name == "verify_tls":
            values[name] = not _boolean(var, raw)
            continue
        if name == "allow_insecure_http":
            values[name] = _boolean(var, raw)
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
        if isinstance(values[name], float) and not math.isfinite(values[name]):
            # Named as written: "1e400" reads better than the infinity it parses to.
            check_number(var, values[name], *BOUNDS[name], shown=raw)
    return Settings(**values).validated()
