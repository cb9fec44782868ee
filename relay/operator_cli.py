"""Operator commands (status, inspect, retry, cancel, destinations, purge)."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    """Add the operator subcommands to the ``relay`` parser."""
    del sub
