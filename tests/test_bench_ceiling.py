"""``bench.drain``'s SQL ceiling: the relay's own statements, run in one PL/pgSQL block.

The block is built from ``relay.queries`` text, so a statement that gains a parameter breaks
it, and only the full benchmark ran it: when the statements by id gained the occurred_at span,
the ceiling failed with ``column "p_occ_lo" does not exist`` and nothing noticed. This runs it
on a small backlog and checks it did the relay's work: every row finished, identifies merged,
one attempt row per request.
"""

from __future__ import annotations

import psycopg

from bench.common import FUNNEL_STEPS
from bench.drain import BATCH_SIZE, build_backlog, run_ceiling


def test_the_sql_ceiling_drains_a_backlog_with_the_relays_statements(dsn: str) -> None:
    customers = 30
    backlog = build_backlog(dsn, customers, per_txn=10)
    assert backlog["rows"] > customers * len(FUNNEL_STEPS)

    start, end = run_ceiling(dsn)

    assert end >= start
    with psycopg.connect(dsn) as conn:
        states = dict(
            conn.execute("SELECT state, count(*) FROM relay_outbox GROUP BY state").fetchall()
        )
        requests, items = conn.execute(
            "SELECT count(*), coalesce(sum(message_count), 0) FROM relay_attempt"
        ).fetchone() or (0, 0)
        # The merged identify carries the traits of the ones merged into it.
        unmerged = conn.execute(
            """
            SELECT count(*) FROM relay_outbox c
            JOIN relay_outbox carrier ON carrier.id = c.coalesced_into
            WHERE c.state = 'coalesced'
              AND NOT (carrier.body -> 'traits') @> (c.body -> 'traits')
              AND NOT EXISTS (SELECT 1 FROM relay_outbox later
                              WHERE later.coalesced_into = c.coalesced_into
                                AND later.id > c.id)
            """
        ).fetchone()
    assert set(states) == {"delivered", "coalesced"}, states
    assert sum(states.values()) == backlog["rows"]
    assert states["coalesced"] > 0
    assert items == states["delivered"]
    assert requests >= -(-states["delivered"] // BATCH_SIZE)
    assert unmerged == (0,)
