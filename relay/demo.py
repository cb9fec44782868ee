"""``relay demo``: the whole product in under a minute, offline."""

from __future__ import annotations

from typing import Any


def register(sub: Any) -> None:
    """Add the ``demo`` subcommand to the ``relay`` parser."""
    del sub
