"""``relay demo``: the whole product in under a minute, offline.

The demo runs every part for real, on one machine:

1. PostgreSQL: ``DATABASE_URL`` (or ``DATABASE_URL_FILE``) when it is set, otherwise the
   embedded server (database ``relay_demo`` in ``--data-dir``, so the demo never shares a
   database with ``relay run``).
2. Customer.io: ``FakeCustomerIO`` on 127.0.0.1, strict mode as always, with random faults
   (by default 10% of requests answer 5xx) so retries show up in the audit table.
3. The relay daemon (``Service``) running while a sample application writes realistic
   funnels in its own transactions with ``record_event``: some through a SQLAlchemy ``Session``,
   some through a psycopg connection. Anonymous page views are skipped, and one order's
   transaction rolls back. The daemon is then stopped and ``drain`` delivers what is left, as
   ``relay run --drain`` would.
4. Plain text tables on stdout: what Customer.io stored, the outbox's delivery states, the
   HTTP requests, a summary and checks. The exit status is 0 only if every committed message
   reached Customer.io (directly, or merged into an identify that did) and nothing of the
   rolled-back transaction or of the anonymous visitors did.

The demo's events all have ids starting with ``relay-demo:``; a run deletes the rows a previous
run left (and their attempt rows) before writing, so running it twice gives the same picture.

One module per part: ``args`` (the command's options), ``funnels`` (the sample application:
its customers, their funnels and its transactions), ``database`` (the database the demo runs
on, and what it refuses), ``run`` (the command: the relay and the application side by side),
``report`` (what happened, as tables and checks).

The relay's CLI builds every subcommand's parser on each start, so these modules import the
heavy ones the demo runs on (psycopg, SQLAlchemy, the daemon) where they are used.
"""

from __future__ import annotations

from typing import Any

from relay.demo.args import add_arguments
from relay.demo.run import cmd_demo

__all__ = ["register"]


def register(sub: Any) -> None:
    """Add the ``demo`` subcommand to the ``relay`` parser."""
    d = sub.add_parser(
        "demo",
        help="show the whole relay working, offline, in under a minute",
        description=(
            "Write sample AppFunnel funnels into the outbox while the relay delivers them to a "
            "local Customer.io stand-in, then print what arrived. Uses DATABASE_URL (or "
            "DATABASE_URL_FILE) if set (its outbox must hold no other messages), else an "
            "embedded PostgreSQL."
        ),
    )
    add_arguments(d)
    d.set_defaults(func=cmd_demo)
