"""Logging: readable text by default, one JSON object a line with ``--log-format json``.

A filter on the handler masks email addresses and any registered secret (write keys, the
database password) in every record, whatever logger it came from, so neither reaches a log
line in clear.

Fields passed with ``extra=`` (``log.warning("...", extra={"destination": name, "status":
429})``) become keys of the JSON object, beside ``ts``, ``level``, ``logger`` and ``msg``, so a
log collector can filter on them without parsing the message; text lines show the message
alone.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any, Final

from relay.errors import ConfigError

LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
FORMATS: Final = ("text", "json")

# Unicode-aware: names and domains outside ASCII (josé@exämple.de) are addresses too, also
# when they arrive JSON-escaped (jos\u00e9@...) inside a response body quoted in a log line.
_CH = r"(?:[\w.%+'-]|\\u[0-9a-fA-F]{4})"
_DOM = r"(?:[\w-]|\\u[0-9a-fA-F]{4})+"
_EMAIL = re.compile(rf"([\w.%+'-]){_CH}*@({_DOM}(?:\.{_DOM})*\.\w{{2,}})")
_secrets: set[str] = set()


def register_secret(secret: str | None) -> None:
    """Never print ``secret``: it is replaced by ``***`` in every log record."""
    if secret and len(secret) >= 4:
        _secrets.add(secret)


def redact(text: str) -> str:
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, "***")
    return _EMAIL.sub(r"\1***@\2", text)


def check_level(level: str, source: str) -> str:
    """``level`` as logging names it (upper case), or a ``ConfigError`` naming ``source``."""
    name = level.strip().upper()
    if name not in LEVELS:
        raise ConfigError(f"{source} {level!r} is not a log level; use one of: {', '.join(LEVELS)}")
    return name


def check_format(fmt: str, source: str) -> str:
    name = fmt.strip().lower()
    if name not in FORMATS:
        raise ConfigError(f"{source} {fmt!r} is not a log format; use one of: {', '.join(FORMATS)}")
    return name


# What every LogRecord has; anything else on a record came from ``extra=``.
_RECORD_ATTRIBUTES: Final = frozenset(
    vars(logging.LogRecord("", logging.INFO, "", 0, "", None, None))
) | {"message", "asctime", "taskName"}


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The fields a log call passed with ``extra=``."""
    return {
        k: v
        for k, v in vars(record).items()
        if k not in _RECORD_ATTRIBUTES and not k.startswith("_")
    }


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        record.msg = redact(message)
        record.args = None
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        for key, value in extra_fields(record).items():
            if isinstance(value, str):
                setattr(record, key, redact(value))
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in extra_fields(record).items():
            # A field named like one of the keys above is kept beside it, not over it.
            out[f"{key}_" if key in out or key == "exc" else key] = value
        if record.exc_text:
            out["exc"] = record.exc_text
        return json.dumps(out, ensure_ascii=False, default=str)


def setup(level: str = "INFO", fmt: str = "text") -> None:
    """Send every record to stderr, redacted; ``level`` and ``fmt`` as ``check_level`` and
    ``check_format`` accept them."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RedactingFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # APScheduler logs every job run at INFO; keep its warnings and errors only.
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    # "skipped: maximum number of running instances reached" only means a delivery run
    # outlasted the poll interval, which is normal under load.
    logging.getLogger("apscheduler.scheduler").setLevel(logging.ERROR)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
