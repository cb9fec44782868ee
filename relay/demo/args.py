"""The options of ``relay demo``: how many customers, which faults, which seed, where.

Each is checked as argparse reads it, so a bad value is one usage line (exit 2) before
anything starts.
"""

from __future__ import annotations

import argparse
from typing import Final

from relay.testing.fakecio import FAULT_KINDS

DEFAULT_CUSTOMERS: Final = 6
DEFAULT_SEED: Final = 7
DEFAULT_FAULTS: Final = "5xx=0.1"
MAX_CUSTOMERS: Final = 500


def add_arguments(d: argparse.ArgumentParser) -> None:
    """The demo's options, on its subcommand's parser."""
    d.add_argument(
        "--customers",
        type=_customer_count,
        default=DEFAULT_CUSTOMERS,
        help=f"customers going through the funnel (default {DEFAULT_CUSTOMERS})",
    )
    d.add_argument(
        "--faults",
        type=_fault_spec,
        default=_fault_spec(DEFAULT_FAULTS),
        metavar="SPEC",
        help=(
            "random faults of the local Customer.io, e.g. 5xx=0.2,429=0.1 (kinds: "
            f"{', '.join(FAULT_KINDS)}); 'none' for none (default {DEFAULT_FAULTS})"
        ),
    )
    d.add_argument(
        "--seed",
        type=int,
        default=DEFAULT_SEED,
        help=f"seed of the sample data, the faults and the retry jitter (default {DEFAULT_SEED})",
    )
    d.add_argument("--data-dir", help="embedded PostgreSQL folder when DATABASE_URL is unset")
    d.add_argument(
        "--force",
        action="store_true",
        help="run even though DATABASE_URL's outbox holds finished messages of others",
    )


def _customer_count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 1 <= n <= MAX_CUSTOMERS:
        raise argparse.ArgumentTypeError(f"must be between 1 and {MAX_CUSTOMERS}, got {n}")
    return n


def _fault_spec(text: str) -> dict[str, float]:
    """``5xx=0.2,429=0.1`` as rates per fault kind; ``none`` (or nothing) for no faults."""
    if text.strip().lower() in ("", "none", "0"):
        return {}
    rates: dict[str, float] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        kind, equals, value = (s.strip() for s in part.partition("="))
        if not equals:
            raise argparse.ArgumentTypeError(f"expected KIND=RATE, got {part.strip()!r}")
        if kind not in FAULT_KINDS:
            raise argparse.ArgumentTypeError(
                f"unknown fault kind {kind!r}; known: {', '.join(FAULT_KINDS)}"
            )
        try:
            rate = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{kind}: {value!r} is not a number") from None
        if not 0.0 <= rate <= 1.0:
            raise argparse.ArgumentTypeError(f"{kind}: the rate must be within 0..1, got {rate}")
        rates[kind] = rate
    if sum(rates.values()) > 1.0:
        raise argparse.ArgumentTypeError("the fault rates add up to more than 1")
    return rates
