"""Every SQL statement the relay and the application API run, as named constants.

Names are table-first (``OUTBOX_CLAIM_HEADS``). Each statement's comment names the index that
serves it and the locks it takes. Parameters use psycopg's ``%(name)s`` style, which
SQLAlchemy's ``exec_driver_sql`` passes through unchanged, so the application API can run the
same text on either kind of connection. Arrays are passed as text and cast in SQL so the
statements stay driver-agnostic and each is one round trip however many rows it touches.

Time comes from the database clock (``now()``): relays on several hosts agree on it, and a
lease is only as good as the clock that judges it.
"""

from __future__ import annotations

from typing import Final

from relay.models.states import DUE_STATES, UNFINISHED_STATES


def _sql_list(states: tuple[str, ...]) -> str:
    return "(" + ", ".join(f"'{s}'" for s in states) + ")"


# The one list of unfinished states (models/states.py), spelled exactly as the partial indexes'
# predicates are (models/schema.py builds them from the same tuples), so the planner matches
# the claim's WHERE to relay_outbox_customer_unfinished_idx and relay_outbox_due_idx.
UNFINISHED: Final = _sql_list(UNFINISHED_STATES)
DUE: Final = _sql_list(DUE_STATES)

# The timestamps the mapping writes (ISO-8601, seconds, optional fraction, a UTC offset or Z):
# what the claim's fast check accepts without asking Python's parser.
ISO_TIMESTAMP: Final = (
    "'^[0-9]{4}-[01][0-9]-[0-3][0-9]T[0-2][0-9]:[0-5][0-9]:[0-5][0-9]([.][0-9]{1,6})?"
    "(Z|[+-][0-2][0-9]:[0-5][0-9])$'"
)

# --- the application's write path -----------------------------------------------------------

# Write events' messages (identify, then track) in one statement, in write order: identity
# values follow ORDER BY ord, so id order is write order. The rows arrive as ONE jsonb array
# parameter (see relay/outbox.py): a single scalar parameter costs the driver nothing to
# adapt, where a text[] of bodies made it escape every quote of every body.
# Index: relay_outbox_message_id_key (message_id, occurred_at): a re-recorded event carries the
# same occurred_at, so it meets its first copy in the same day's partition and writes nothing.
# Locks: row locks on the inserted rows only; a concurrent insert of the same messageId waits
# for the first transaction and then skips. Triggers: NOTIFY once per statement (after
# insert); and, per row more than 25 hours old only (a WHEN clause, so live traffic calls no
# function), the floor lowered under it (a lock on the floor row then, until commit: a late
# event's cost, not the live traffic's).
OUTBOX_INSERT_MESSAGES: Final = """
INSERT INTO relay_outbox
    (message_id, event_id, kind, customer_key, project_id, event_type, body, occurred_at)
SELECT m.message_id, m.event_id, m.kind, m.customer_key, m.project_id, m.event_type,
       m.body, m.occurred_at
FROM jsonb_to_recordset(%(rows)s::jsonb)
     AS m(ord int, message_id text, event_id text, kind text, customer_key text,
          project_id text, event_type text, body jsonb, occurred_at timestamptz)
ORDER BY m.ord
ON CONFLICT (message_id, occurred_at) DO NOTHING
RETURNING message_id
"""

# --- claiming ---------------------------------------------------------------------------------

# Every statement that names rows by id also passes the span of their occurred_at (a claim's
# rows: relay.lease.Lease.span). The outbox is partitioned by day on occurred_at, and an id
# alone would make PostgreSQL plan and probe every day's primary key: measured at 31 days,
# 12 ms to plan and 20,000 buffer reads to update 300 rows, against 1 ms and 1,200 with it.
SPAN: Final = "o.occurred_at BETWEEN %(occ_lo)s::timestamptz AND %(occ_hi)s::timestamptz"
# SPAN's parameters for rows of any day: right for any rows, only slower.
ANY_SPAN: Final = {"occ_lo": "-infinity", "occ_hi": "infinity"}

# The relay's bookkeeping (claims, marks, attempt rows) commits without waiting for the WAL
# flush: a database crash forgets at most the last few hundred milliseconds of marks, and those
# messages are sent again under the same messageId, inside the at-least-once contract. The
# application's own writes stay fully durable; this is set on the relay's connections only.
# JIT is off for the same sessions and for the operator commands' (SESSION_NO_JIT): on the
# partitioned outbox the planner's cost of a purge window passes jit_above_cost and PostgreSQL
# spent 2.3 s compiling 215 functions for a statement that ran in 30 ms (measured with
# EXPLAIN (ANALYZE) at 8 partitions). Every statement here is short; none gains from JIT.
SESSION_ASYNC_COMMIT: Final = (
    "SELECT set_config('synchronous_commit', 'off', false), set_config('jit', 'off', false)"
)
SESSION_NO_JIT: Final = "SELECT set_config('jit', 'off', false)"

# Does this database exist (the embedded server's first start)? Index: catalog. Locks: none.
DATABASE_EXISTS: Final = "SELECT 1 FROM pg_database WHERE datname = %s"

# Is this session still there? A sending thread asks before it sends on a connection that sat
# idle: otherwise it would learn that the server ended the session (a restart,
# idle_session_timeout, an operator) only after the request, when the outcome cannot be
# recorded and the batch is sent again after its lease. Index: none. Locks: none.
SESSION_CHECK: Final = "SELECT 1"

# The claim's floor (relay_outbox_floor, migration relay_0006): no unfinished row has an earlier
# occurred_at. A scalar subquery, an InitPlan read in the statement's own snapshot.
FLOOR: Final = "(SELECT unfinished_from FROM relay_outbox_floor)"
# The claim prunes with a value the relay passes, %(floor)s: the floor as the relay last saw it.
# A parameter, not FLOOR, because PostgreSQL prunes with a parameter before it starts the plan
# (when planning, or at executor start-up for a generic plan), so the days before it are never
# opened; with FLOOR, an InitPlan, it prunes only at run time, after every day's scans were set
# up: a claim prepared as the relay runs it took 0.96 ms with 5 partitions, 4.7 ms with 35 and
# 5.8 ms with 65, empty days all (bench.claimdays); with the parameter, 0.9-1.0 ms at each. The
# passed value may be stale: a late insert may have lowered the floor since. FLOOR_GATE makes
# that safe: the statement returns nothing unless the floor in its own snapshot is at or above
# the value passed, and then no unfinished row it can see is older than that value, so pruning
# with it skips none. The relay then reads the floor (FLOOR_NOW) and claims again.
FLOOR_HINT: Final = "%(floor)s::timestamptz"
FLOOR_GATE: Final = f"{FLOOR} >= {FLOOR_HINT}"

# Lock the first due row of up to %(customers)s customers whose earlier messages are all
# finished. A row with an earlier unfinished row of the same customer (pending, in flight
# elsewhere, waiting for a retry, held) is not a head, so no relay can send a customer's later
# message before an earlier one is done; a customer waiting for a retry holds up only itself.
# Race: a head another relay is claiming right now is row-locked (SKIP LOCKED passes over it)
# and its followers fail NOT EXISTS against it in our snapshot, so one claim owns a customer.
# Partitions: both scans read only the days from the floor passed on (FLOOR_HINT, guarded by
# FLOOR_GATE), which no unfinished row is older than: PostgreSQL prunes the other partitions
# before the statement starts, so a claim opens the few days that hold a backlog, not thirty
# days of delivered history. The floor in this statement's snapshot is returned with each row,
# for the relay's next claim (as text: see FLOOR_NOW).
# Index: relay_outbox_due_idx (partial: state IN pending/retrying, ordered by next_attempt_at,
# id) for the scan; relay_outbox_customer_unfinished_idx for the NOT EXISTS probe.
# Locks: FOR UPDATE on the returned rows, skipping rows locked by other relays.
OUTBOX_CLAIM_HEADS: Final = f"""
SELECT m.id, m.customer_key, {FLOOR}::text AS floor
FROM relay_outbox m
WHERE m.state IN {DUE}
  AND m.next_attempt_at <= now()
  AND m.occurred_at >= {FLOOR_HINT}
  AND {FLOOR_GATE}
  AND NOT EXISTS (
      SELECT 1 FROM relay_outbox e
      WHERE e.customer_key = m.customer_key
        AND e.id < m.id
        AND e.occurred_at >= {FLOOR_HINT}
        AND e.state IN {UNFINISHED})
ORDER BY m.next_attempt_at, m.id
LIMIT %(customers)s
FOR UPDATE OF m SKIP LOCKED
"""

# For each claimed head, the customer's unfinished rows from the head on, in write order, at
# most %(per_customer)s each. The caller keeps the prefix that is due (it stops at the first
# row that is held, in flight or waiting for a later retry). The body comes as text: tracks
# are sent as stored, and only identifies (which coalescing merges) are parsed. ``shape_ok``
# is the planner's structural check of a body (relay.plan.body_problem) done here, on jsonb,
# where it costs a few field lookups instead of a parse in Python: a track that passes is sent
# unparsed; any other row is parsed and judged by the planner, which names the problem.
# A message's age (for the age limit) restarts when an operator re-queues it, or an old
# message would die again on its first retryable failure.
# Index: relay_outbox_customer_unfinished_idx (customer_key, id), one range scan per customer.
# Locks: FOR UPDATE on those rows. Nobody else can be claiming them (their head is ours), so
# this only waits for an operator command touching the same rows.
OUTBOX_CLAIM_FOLLOWERS: Final = f"""
SELECT o.id, o.customer_key, o.kind, o.project_id, o.event_type, o.body::text, o.attempts,
       o.state,
       o.next_attempt_at <= now() AS due,
       extract(epoch FROM now() - greatest(o.created_at, o.requeued_at))::float8 AS age_s,
       (jsonb_typeof(o.body) = 'object'
        AND o.body ->> 'type' = o.kind
        AND coalesce(jsonb_typeof(o.body -> 'userId') = 'string' AND o.body ->> 'userId' <> '',
                     false)
        AND coalesce(jsonb_typeof(o.body -> 'event') = 'string' AND o.body ->> 'event' <> '',
                     false)
        AND coalesce(jsonb_typeof(o.body -> 'properties') = 'object', NOT o.body ? 'properties')
        AND coalesce(jsonb_typeof(o.body -> 'messageId') = 'string', NOT o.body ? 'messageId')
        AND coalesce(jsonb_typeof(o.body -> 'timestamp') = 'string'
                     AND o.body ->> 'timestamp' ~ {ISO_TIMESTAMP},
                     NOT o.body ? 'timestamp')) IS TRUE AS shape_ok,
       o.occurred_at
FROM unnest(%(head_ids)s::bigint[], %(customer_keys)s::text[]) AS h(id, customer_key)
CROSS JOIN LATERAL (
    SELECT * FROM relay_outbox o
    WHERE o.customer_key = h.customer_key
      AND o.id >= h.id
      AND o.occurred_at >= {FLOOR_HINT}
      AND o.state IN {UNFINISHED}
    ORDER BY o.id
    LIMIT %(per_customer)s
    FOR UPDATE
) AS o
WHERE {FLOOR_GATE}
ORDER BY o.customer_key, o.id
"""

# Take the claimed rows, in one statement: the rows to send go in flight under this claim's
# lease (owner, expiry and a token unique to the claim; a merged identify's carrier also stores
# the merged body, so a retry re-sends the merged identify under the same messageId),
# merged-away identifies become coalesced, pointing at their carrier, and poison rows (a body
# Customer.io could never accept, or over the size limit) become dead with the reason, no
# attempt counted. %(bodies)s is ONE JSON array, aligned with %(ids)s, null except for
# carriers (a text[] of bodies made the driver escape every quote of every body: 13% of the
# claiming thread in the drain profile); %(errors)s is NULL except for dead rows.
# One statement rather than several: the drain profile showed each round trip here costing as
# much as the row work. Index: primary key. Locks: already held (claimed in this transaction).
OUTBOX_CLAIM_MARK: Final = (
    """
UPDATE relay_outbox o
SET state = c.state,
    coalesced_into = c.into_id,
    body = coalesce(c.body, o.body),
    last_error = CASE WHEN c.state = 'dead' THEN c.error ELSE o.last_error END,
    lease_owner = CASE WHEN c.state = 'in_flight' THEN %(owner)s END,
    lease_token = CASE WHEN c.state = 'in_flight' THEN %(token)s::bigint END,
    lease_expires_at = CASE WHEN c.state = 'in_flight'
                            THEN now() + %(lease_s)s * interval '1 second' END,
    updated_at = now()
FROM (
    SELECT c.id, c.state, c.into_id, c.error, nullif(b.body, 'null'::jsonb) AS body
    FROM unnest(%(ids)s::bigint[], %(states)s::text[], %(into_ids)s::bigint[],
                %(errors)s::text[]) WITH ORDINALITY AS c(id, state, into_id, error, n)
    JOIN jsonb_array_elements(%(bodies)s::jsonb) WITH ORDINALITY AS b(body, n) USING (n)
) AS c
WHERE o.id = c.id AND """
    + SPAN
    + """
"""
)

# Rows that cannot be sent now (no destination, destination disabled or paused): held, with the
# reason, no attempt counted. Later rows of the customer wait behind them (order), other
# customers do not. Index: primary key. Locks: already held.
OUTBOX_MARK_HELD: Final = f"""
UPDATE relay_outbox o
SET state = 'held', last_error = %(reason)s, lease_owner = NULL, lease_expires_at = NULL,
    lease_token = NULL, updated_at = now()
WHERE id = ANY(%(ids)s::bigint[]) AND {SPAN}
"""

# --- outcomes ---------------------------------------------------------------------------------

# Record the outcome of a request, row by row (delivered, retrying with its delay, dead, held).
# Fenced on the claim's token: only rows still in flight under THIS claim are touched. If the
# lease ran out and another claim took a row (another relay, or this one again after a
# restart under the same name), that claim's record wins and ours changes nothing.
# The caller passes the ids in ascending order: with the nested loop over unnest that the
# planner picks for arrays this size, rows are then locked in id order, as the lease renewal
# locks them, so the two never deadlock.
# Index: primary key. Locks: row locks on the updated rows, for the statement's transaction.
OUTBOX_RECORD_OUTCOMES: Final = (
    """
UPDATE relay_outbox o
SET state = r.state,
    attempts = o.attempts + r.attempted,
    next_attempt_at = CASE WHEN r.state = 'retrying'
                           THEN now() + r.delay_s * interval '1 second'
                           ELSE o.next_attempt_at END,
    delivered_at = CASE WHEN r.state = 'delivered' THEN now() ELSE o.delivered_at END,
    last_error = r.error,
    lease_owner = NULL, lease_expires_at = NULL, lease_token = NULL, updated_at = now()
FROM unnest(%(ids)s::bigint[], %(states)s::text[], %(attempted)s::int[],
            %(delays)s::float8[], %(errors)s::text[]) AS r(id, state, attempted, delay_s, error)
WHERE o.id = r.id AND o.state = 'in_flight' AND o.lease_token = %(token)s::bigint
  AND """
    + SPAN
    + """
"""
)

# Hand back claimed rows that were not sent (shutdown, or an earlier row of the same customer
# failed in this cycle): no attempt counted; they keep their place in the customer's order.
# Fenced on the claim's token like the outcomes. Index: primary key. Locks: row locks.
OUTBOX_RELEASE: Final = f"""
UPDATE relay_outbox o
SET state = CASE WHEN attempts > 0 THEN 'retrying' ELSE 'pending' END,
    next_attempt_at = greatest(next_attempt_at, now() + %(delay_s)s * interval '1 second'),
    lease_owner = NULL, lease_expires_at = NULL, lease_token = NULL, updated_at = now()
WHERE id = ANY(%(ids)s::bigint[]) AND state = 'in_flight' AND lease_token = %(token)s::bigint
  AND {SPAN}
"""

# A destination paused (401/403) while a claim still held some of its rows: those rows are
# held, unsent, no attempt counted. Fenced on the claim's token like a release.
# Index: primary key. Locks: row locks.
OUTBOX_HOLD_CLAIMED: Final = f"""
UPDATE relay_outbox o
SET state = 'held', last_error = %(reason)s, lease_owner = NULL, lease_expires_at = NULL,
    lease_token = NULL, updated_at = now()
WHERE id = ANY(%(ids)s::bigint[]) AND state = 'in_flight' AND lease_token = %(token)s::bigint
  AND {SPAN}
"""

# Hand back claimed rows whose request may have gone out but whose outcome was never recorded
# (the cycle's session was cut after sending; then the relay stops): like a lease rescue, the
# attempt is counted, because Customer.io may hold them under their messageId, so they are
# never merged or rewritten again. Fenced on the claim's token. Index: primary key.
# Locks: row locks.
OUTBOX_RELEASE_MAYBE_SENT: Final = f"""
UPDATE relay_outbox o
SET state = 'retrying', attempts = attempts + 1, next_attempt_at = now(),
    last_error = 'relay lost its database session before it recorded the outcome of a '
                 || 'request that may have reached Customer.io',
    lease_owner = NULL, lease_expires_at = NULL, lease_token = NULL, updated_at = now()
WHERE id = ANY(%(ids)s::bigint[]) AND state = 'in_flight' AND lease_token = %(token)s::bigint
  AND {SPAN}
"""

# Renew the leases of rows still in flight under our claims, and say which ones we still
# hold, under which claim (a row one claim lost may be another claim's of ours now). A row
# not returned for a claim was finished by it meanwhile, or lost (its lease ran out and a
# rescue took it), and a lost row must not be sent. The array is sorted by the caller so the
# primary-key scan locks in id order, like the outcome records.
# Index: primary key (id = ANY). Locks: row locks on the renewed rows.
OUTBOX_EXTEND_LEASE: Final = f"""
UPDATE relay_outbox o
SET lease_expires_at = now() + %(lease_s)s * interval '1 second'
WHERE id = ANY(%(ids)s::bigint[]) AND state = 'in_flight'
  AND lease_token = ANY(%(tokens)s::bigint[]) AND {SPAN}
RETURNING id, lease_token
"""

# One row per HTTP request. Index: none on the write path (the GIN index on message_ids and the
# started_at index are maintained). Locks: none beyond the insert.
ATTEMPT_INSERT: Final = """
INSERT INTO relay_attempt
    (relay_instance, destination, started_at, latency_ms, status_code, outcome, error,
     response_snippet, request_bytes, message_count, message_ids)
VALUES (%(relay_instance)s, %(destination)s, %(started_at)s, %(latency_ms)s, %(status_code)s,
        %(outcome)s, %(error)s, %(response_snippet)s, %(request_bytes)s, %(message_count)s,
        %(message_ids)s::bigint[])
"""

# --- background services ----------------------------------------------------------------------

# Rows whose relay died or stalled mid-cycle (lease expired): claimable again at once, by any
# relay. The attempt is counted, since the request may have reached Customer.io before the
# relay died. A claim's rows of one customer are taken together or not at all: taking an
# earlier row while a later one stays in flight (and is then delivered by its claim) would
# have the earlier one re-sent after the later one, an older identify over a newer profile.
# Rows are locked in id order, as every other statement that locks in-flight rows
# does, and SKIP LOCKED: a row whose outcome is being recorded right now is left alone (it is
# about to be finished), so a rescue never waits on, or deadlocks with, a sending relay. At
# most 10,000 a run; the next run takes the rest.
# Index: relay_outbox_lease_idx (partial: in flight) for the scan,
# relay_outbox_customer_unfinished_idx for the sibling check, primary key for the update (in
# the days between the oldest and newest rescued row, pruned when the statement runs).
# Locks: row locks.
OUTBOX_RESCUE_EXPIRED: Final = """
WITH expired AS (
    SELECT o.id, o.occurred_at FROM relay_outbox o
    WHERE o.state = 'in_flight' AND o.lease_expires_at < now()
      AND NOT EXISTS (
          SELECT 1 FROM relay_outbox l
          WHERE l.customer_key = o.customer_key
            AND l.state = 'in_flight'
            AND l.lease_token = o.lease_token
            AND l.lease_expires_at >= now())
    ORDER BY o.id
    LIMIT 10000
    FOR UPDATE SKIP LOCKED
)
UPDATE relay_outbox o
SET state = 'retrying', attempts = o.attempts + 1, next_attempt_at = now(),
    last_error = 'lease of relay ' || coalesce(o.lease_owner, '?')
                 || ' expired before it recorded an outcome',
    lease_owner = NULL, lease_expires_at = NULL, lease_token = NULL, updated_at = now()
WHERE o.id = ANY(ARRAY(SELECT id FROM expired)) AND o.state = 'in_flight'
  AND o.occurred_at >= (SELECT min(occurred_at) FROM expired)
  AND o.occurred_at <= (SELECT max(occurred_at) FROM expired)
  AND o.lease_expires_at < now()
RETURNING o.id
"""

# Held rows whose project now has a usable destination go back to the queue, in place.
# %(routable)s: projects with an enabled, unpaused destination row; %(configured)s: every
# project with a row; %(default_ok)s: whether the default destination is usable.
# Index: relay_outbox_held_idx (partial: held). Locks: row locks.
OUTBOX_RELEASE_HELD: Final = """
UPDATE relay_outbox
SET state = CASE WHEN attempts > 0 THEN 'retrying' ELSE 'pending' END,
    next_attempt_at = now(), updated_at = now()
WHERE state = 'held'
  AND (project_id = ANY(%(routable)s::text[])
       OR (%(default_ok)s AND (project_id IS NULL
                               OR NOT project_id = ANY(%(configured)s::text[]))))
RETURNING id
"""

# Is anything left to deliver (for --drain)? Held rows are reported, not waited for, and so are
# the rows queued behind a held row of the same customer: per-customer order keeps them until
# the held row is released or cancelled, so waiting for them would never end.
# Index: relay_outbox_customer_unfinished_idx (partial on unfinished states), for the scan and
# for each row's probe of its customer's earlier rows. Locks: none.
OUTBOX_COUNT_ACTIVE: Final = f"""
SELECT count(*) FILTER (WHERE state <> 'held' AND NOT behind_held) AS active,
       count(*) FILTER (WHERE state = 'held' OR behind_held) AS held
FROM (
    SELECT o.state,
           o.state <> 'held' AND EXISTS (
               SELECT 1 FROM relay_outbox h
               WHERE h.customer_key = o.customer_key AND h.id < o.id AND h.state = 'held')
               AS behind_held
    FROM relay_outbox o
    WHERE o.state IN {UNFINISHED}
) unfinished
"""

# Backlog figures for metrics: counts per unfinished state and the oldest unfinished row's age.
# Index: relay_outbox_customer_unfinished_idx. Locks: none.
OUTBOX_BACKLOG: Final = f"""
SELECT state, count(*) AS n, extract(epoch FROM now() - min(created_at))::float8 AS oldest_s
FROM relay_outbox
WHERE state IN {UNFINISHED}
GROUP BY state
"""

# --- destinations -----------------------------------------------------------------------------

# The relays read the destinations (small table, every few seconds) with
# DESTINATION_LIST_WITH_KEY, in the operators' section below.

# A relay got 401/403 for this destination: stop sending until the key changes.
# Index: primary key. Locks: row lock on the destination.
DESTINATION_PAUSE: Final = """
UPDATE relay_destination SET paused_at = now(), paused_reason = %(reason)s, updated_at = now()
WHERE project_id = %(project_id)s AND write_key = %(write_key)s
"""

# --- throttling (429) -------------------------------------------------------------------------

# A destination answered 429: no relay sends to it for %(pause_s)s seconds (a later pause
# already recorded is kept). Index: primary key (ON CONFLICT). Locks: row lock on the
# destination's throttle row, until commit.
THROTTLE_SET: Final = """
INSERT INTO relay_throttle AS t (destination, resume_at, reason)
VALUES (%(destination)s, now() + %(pause_s)s * interval '1 second', %(reason)s)
ON CONFLICT (destination) DO UPDATE
SET resume_at = greatest(t.resume_at, excluded.resume_at),
    reason = excluded.reason,
    updated_at = now()
"""

# Destinations that may not be sent to yet, and for how many more seconds. Read by every
# relay before it sends (a handful of rows at most). Index: seq scan (tiny table). Locks: none.
THROTTLE_ACTIVE: Final = """
SELECT destination, extract(epoch FROM resume_at - now())::float8 AS wait_s
FROM relay_throttle
WHERE resume_at > now()
"""

# --- the schema's revision ---------------------------------------------------------------------

# Whether the relay's outbox exists, and its comment, which names the schema revision
# (migration relay_0005; relay.migrate.schema_problem reads it). Catalog lookups any role may
# make: relay_worker and relay_operator cannot read the Alembic version table, and an
# application that merged the relay's scripts into its history keeps the revision elsewhere.
# Index: pg_class by name (to_regclass, resolved on the search_path), pg_description by
# object. Locks: none.
SCHEMA_REVISION: Final = """
SELECT to_regclass('relay_outbox') IS NOT NULL,
       obj_description(to_regclass('relay_outbox'), 'pg_class')
"""

# --- wake-ups ---------------------------------------------------------------------------------

# Notification channel fired by the relay_outbox_notify trigger (see the first migration).
NOTIFY_CHANNEL: Final = "relay_outbox"
LISTEN: Final = "LISTEN relay_outbox"

# --- operators (views, CLI, retention) --------------------------------------------------------

# `relay status --exact`: one row per destination (the relay_status view of migration 0002).
# Index: none, the view counts every row of relay_outbox (exact figures, a sequential scan:
# seconds on millions of finished rows). Locks: ACCESS SHARE on relay_outbox, no row locks.
STATUS_BY_DESTINATION: Final = """
SELECT destination, pending, in_flight, retrying, held, delivered, coalesced, dead, cancelled,
       total, oldest_undelivered_age_s, lag_s
FROM relay_status
ORDER BY destination
"""

# Run before OUTBOX_STATUS_BACKLOG, in its transaction (set_config's is_local): plain index
# scans only. With statistics from before a drain (autovacuum off or behind, the last ANALYZE
# saw the backlog), the planner expects a partition full of unfinished rows and reads it whole
# (measured: 570 ms, a sequential scan of a 2,000,000-row day that held none), or builds a
# bitmap of every entry before its LIMIT can stop it. An index scan stops at the limit, and
# marks the dead entries it passes so that the next one skips them (29 ms on the same day).
# Index: none. Locks: none.
STATUS_INDEX_SCANS_ONLY: Final = (
    "SELECT set_config('enable_seqscan', 'off', true), set_config('enable_bitmapscan', 'off', true)"
)

# `relay status`: per destination, the exact number of messages in each unfinished state and
# of dead ones, and the ages of the oldest undelivered message and of the oldest waiting to be
# sent, with the relay_status view's meaning (oldest_undelivered_age_s: pending, retrying, in
# flight or held; lag_s: pending or retrying), without reading the finished history. Each
# aggregate's WHERE is exactly a partial index's predicate, so the planner reads only the rows
# that index holds: the backlog and the dead messages, never the millions delivered (the plan
# is checked on a table of 200,000 finished rows in tests/test_operator_cli.py). These indexes
# hold neither state, project_id nor created_at, so each selected row costs one heap fetch
# (about 1 us a row here, measured on a 1,000,000-row backlog).
# Bounded: each aggregate reads at most %(unfinished_limit)s and %(dead_limit)s rows (their
# LIMITs), so a backlog of millions after an outage still answers in milliseconds; the row
# counts say whether a limit was reached, and relay.operator_cli then estimates the states
# that one read counted (their counts are only lower bounds) and marks the ages as lower
# bounds. A plain (not parallel) Append reads the partitions in the order of their days, so
# the rows read are then the oldest days' first, and the ages' lower bounds the closer.
# One statement, so both counts come from one snapshot.
# Index: relay_outbox_customer_unfinished_idx (partial: UNFINISHED; up to the limit, by an
# index scan) and relay_outbox_dead_idx (partial: dead). Locks: ACCESS SHARE on relay_outbox,
# as any read; no row locks.
OUTBOX_STATUS_BACKLOG: Final = f"""
WITH unfinished AS (
    SELECT coalesce(project_id, 'default') AS destination,
           count(*) FILTER (WHERE state = 'pending') AS pending,
           count(*) FILTER (WHERE state = 'in_flight') AS in_flight,
           count(*) FILTER (WHERE state = 'retrying') AS retrying,
           count(*) FILTER (WHERE state = 'held') AS held,
           min(created_at) AS oldest_undelivered,
           min(created_at) FILTER (WHERE state IN {DUE}) AS oldest_waiting
    FROM (SELECT project_id, state, created_at FROM relay_outbox
          WHERE state IN {UNFINISHED}
          LIMIT %(unfinished_limit)s) AS r
    GROUP BY 1
), dead AS (
    SELECT coalesce(project_id, 'default') AS destination, count(*) AS dead
    FROM (SELECT project_id FROM relay_outbox WHERE state = 'dead' LIMIT %(dead_limit)s) AS r
    GROUP BY 1
)
SELECT destination,
       coalesce(u.pending, 0), coalesce(u.in_flight, 0), coalesce(u.retrying, 0),
       coalesce(u.held, 0), coalesce(d.dead, 0),
       extract(epoch FROM now() - u.oldest_undelivered)::float8 AS oldest_undelivered_age_s,
       extract(epoch FROM now() - u.oldest_waiting)::float8 AS lag_s
FROM unfinished u
FULL JOIN dead d USING (destination)
ORDER BY destination
"""

# `relay status`: the planner's statistics of relay_outbox's partitions, from which the finished
# states are estimated (relay.operator_cli.estimate_finished) instead of counted. Per partition,
# as the planner does for a table: reltuples / relpages (the density the last VACUUM or
# ANALYZE saw) times its size in pages now, so rows written since are counted; an empty
# partition counts 0; one with pages but no density yet makes the total unknown (-1). The
# shares of state are the partitions' most common values weighted by their rows. The columns
# keep the shape of one table's statistics: reltuples is the summed estimate and relpages
# equals pages (the scaling is done here). analyzed_at is the oldest analysis of a non-empty
# partition (NULL if one never was). pg_stats shows a column only to a user who may SELECT it:
# relay_operator may (migration 0002), relay_app may not. No row of relay_outbox is read.
# Index: catalog only. Locks: ACCESS SHARE on each partition for an instant
# (pg_relation_size opens it); nothing else.
OUTBOX_STATUS_ESTIMATE: Final = """
WITH leaf AS (
    SELECT c.relname, n.nspname, c.reltuples::float8 AS reltuples, c.relpages::bigint AS relpages,
           pg_relation_size(c.oid) / current_setting('block_size')::bigint AS pages,
           greatest(pg_stat_get_last_analyze_time(c.oid),
                    pg_stat_get_last_autoanalyze_time(c.oid)) AS analyzed_at
    FROM pg_partition_tree('relay_outbox'::regclass) t
    JOIN pg_class c ON c.oid = t.relid
    JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE t.isleaf
), est AS (
    SELECT l.*,
           CASE WHEN l.pages = 0 THEN 0::float8
                WHEN l.reltuples < 0 OR l.relpages = 0 THEN NULL
                ELSE l.reltuples / l.relpages * l.pages END AS rows
    FROM leaf l
), total AS (
    SELECT CASE WHEN bool_and(rows IS NOT NULL) THEN sum(rows) ELSE -1 END AS rows,
           coalesce(sum(pages), 0)::bigint AS pages,
           CASE WHEN coalesce(bool_and(analyzed_at IS NOT NULL) FILTER (WHERE pages > 0), false)
                THEN min(analyzed_at) FILTER (WHERE pages > 0) END AS analyzed_at
    FROM est
), freq AS (
    SELECT v.val, sum(v.freq * e.rows) AS n
    FROM est e
    JOIN pg_stats s
      ON s.schemaname = e.nspname AND s.tablename = e.relname AND s.attname = 'state'
     AND NOT s.inherited
    CROSS JOIN LATERAL unnest(s.most_common_vals::text::text[], s.most_common_freqs::float8[])
         AS v(val, freq)
    WHERE e.rows > 0
    GROUP BY v.val
)
SELECT t.rows, t.pages, t.pages,
       (SELECT array_agg(f.val ORDER BY f.n DESC) FROM freq f WHERE t.rows > 0) AS state_values,
       (SELECT array_agg(f.n / t.rows ORDER BY f.n DESC) FROM freq f WHERE t.rows > 0)
           AS state_freqs,
       (SELECT count(*)::float8 FROM freq f HAVING count(*) > 0) AS state_n_distinct,
       t.analyzed_at
FROM total t
"""

# Destinations without their keys: readable by relay_operator, whose grant on relay_destination
# leaves out write_key. Index: seq scan (small table). Locks: none.
DESTINATION_LIST_WITHOUT_KEY: Final = """
SELECT project_id, region, api_url, enabled, paused_at, paused_reason, updated_at
FROM relay_destination
ORDER BY project_id
"""

# The same with the key: what the relays route with, and what the CLI prints masked.
# Index: seq scan (small table). Locks: none.
DESTINATION_LIST_WITH_KEY: Final = """
SELECT project_id, region, api_url, enabled, paused_at, paused_reason, updated_at, write_key
FROM relay_destination
ORDER BY project_id
"""

# May this session read write_key (relay_operator may not)? Index: none (catalog). Locks: none.
DESTINATION_CAN_READ_KEY: Final = """
SELECT has_column_privilege('relay_destination', 'write_key', 'SELECT')
"""

# `relay destinations set`: create or replace a destination. A new key or endpoint lifts a
# pause (the pause was about the old one) and enables the row; the same key again keeps both,
# since Customer.io would only reject it again. Index: primary key (ON CONFLICT).
# Locks: row lock on the destination, until commit.
DESTINATION_UPSERT: Final = """
INSERT INTO relay_destination AS d (project_id, region, api_url, write_key, enabled)
VALUES (%(project_id)s, %(region)s, %(api_url)s, %(write_key)s, true)
ON CONFLICT (project_id) DO UPDATE
SET region = excluded.region,
    api_url = excluded.api_url,
    write_key = excluded.write_key,
    enabled = d.enabled
              OR (d.write_key, d.region, d.api_url)
                 IS DISTINCT FROM (excluded.write_key, excluded.region, excluded.api_url),
    paused_at = CASE WHEN (d.write_key, d.region, d.api_url)
                          IS DISTINCT FROM (excluded.write_key, excluded.region, excluded.api_url)
                     THEN NULL ELSE d.paused_at END,
    paused_reason = CASE WHEN (d.write_key, d.region, d.api_url)
                              IS DISTINCT FROM (excluded.write_key, excluded.region,
                                                excluded.api_url)
                         THEN NULL ELSE d.paused_reason END,
    updated_at = now()
RETURNING enabled, paused_reason
"""

# `relay destinations enable|disable`. Index: primary key. Locks: row lock on the destination.
DESTINATION_SET_ENABLED: Final = """
UPDATE relay_destination SET enabled = %(enabled)s, updated_at = now()
WHERE project_id = %(project_id)s
RETURNING enabled, paused_reason
"""

# A destination became usable: its held rows go back to the queue, in bounded batches so each
# transaction is short. SKIP LOCKED: a row a relay is claiming right now is left to the relays'
# own release of held rows, a few seconds later, rather than waited for (no lock-order
# deadlock with a claim). Index: relay_outbox_held_idx (partial: held, by project_id).
# Locks: row locks on the batch. (Every batched statement here names its rows with
# id = ANY(ARRAY(...)): a primary-key probe per row, never a join the planner could turn into a
# scan of the whole table.)
OUTBOX_RELEASE_HELD_PROJECT: Final = """
WITH picked AS (
    SELECT id FROM relay_outbox
    WHERE state = 'held' AND project_id = %(project_id)s
    LIMIT %(batch)s
    FOR UPDATE SKIP LOCKED
)
UPDATE relay_outbox o
SET state = CASE WHEN o.attempts > 0 THEN 'retrying' ELSE 'pending' END,
    next_attempt_at = now(), updated_at = now()
WHERE o.id = ANY(ARRAY(SELECT id FROM picked)) AND o.state = 'held'
RETURNING o.id
"""

# Wake idle relays now rather than at their next poll (same channel and empty payload as the
# insert trigger of migration 0001). Delivered at commit. Index: none. Locks: none.
OUTBOX_WAKE_RELAYS: Final = "SELECT pg_notify('relay_outbox', '')"

# The selectors of `relay retry` and `relay cancel`; a NULL parameter selects everything. The
# connection never prepares these statements, so each is planned with its actual values and
# the unused conditions fold away.
_SELECTED = """
  AND (%(ids)s::bigint[] IS NULL OR id = ANY(%(ids)s::bigint[]))
  AND (%(customer)s::text IS NULL OR customer_key = %(customer)s::text)
  AND (%(destination)s::text IS NULL OR coalesce(project_id, 'default') = %(destination)s::text)
  AND (%(since)s::timestamptz IS NULL OR created_at >= %(since)s::timestamptz)
  AND (%(until)s::timestamptz IS NULL OR created_at < %(until)s::timestamptz)
"""

# How many rows in %(states)s the selectors match (--dry-run, and rows left busy).
# Index: relay_outbox_dead_idx for dead rows, relay_outbox_customer_unfinished_idx for
# unfinished ones with --customer, the primary key with --id. Locks: none.
OUTBOX_COUNT_SELECTED: Final = f"""
SELECT count(*) FROM relay_outbox
WHERE state = ANY(%(states)s::text[])
{_SELECTED}
"""

# `relay retry`: dead rows back to the queue with a fresh attempt budget, in batches (the loop
# stops when a batch changes nothing). A dead row is finished, so the claim's floor may have
# passed its day: the floor is lowered to the oldest re-queued row in the same statement.
# SKIP LOCKED never waits on a relay; the state is checked again on the locked row. Index:
# relay_outbox_dead_idx (partial: dead), or the primary key / relay_outbox_customer_key_idx when
# --id / --customer narrow it. Locks: row locks on the batch.
OUTBOX_REQUEUE_DEAD: Final = f"""
WITH picked AS (
    SELECT id FROM relay_outbox
    WHERE state = 'dead'
{_SELECTED}
    LIMIT %(batch)s
    FOR UPDATE SKIP LOCKED
), requeued AS (
    UPDATE relay_outbox o
    SET state = 'pending', attempts = 0, next_attempt_at = now(), lease_owner = NULL,
        lease_expires_at = NULL, lease_token = NULL, requeued_by = %(by)s, requeued_at = now(),
        updated_at = now()
    WHERE o.id = ANY(ARRAY(SELECT id FROM picked)) AND o.state = 'dead'
    RETURNING o.id, o.occurred_at
)
SELECT r.id
FROM requeued r,
     (SELECT relay_outbox_floor_lower(min(occurred_at)) FROM requeued) AS lowered
"""

# `relay cancel`: rows not yet sent (pending, retrying, held) are cancelled, in batches. Never
# in-flight rows: a relay is sending them. A row a relay is claiming right now is locked and
# skipped; if the claim leaves it unsent, the next batch (or the caller's re-count) sees it.
# Index: relay_outbox_customer_unfinished_idx with --customer, relay_outbox_due_idx /
# relay_outbox_held_idx otherwise, the primary key with --id. Locks: row locks on the batch.
OUTBOX_CANCEL_UNSENT: Final = f"""
WITH picked AS (
    SELECT id FROM relay_outbox
    WHERE state IN ('pending', 'retrying', 'held')
{_SELECTED}
    LIMIT %(batch)s
    FOR UPDATE SKIP LOCKED
)
UPDATE relay_outbox o
SET state = 'cancelled', lease_owner = NULL, lease_expires_at = NULL, lease_token = NULL,
    requeued_by = %(by)s, requeued_at = now(), updated_at = now()
WHERE o.id = ANY(ARRAY(SELECT id FROM picked)) AND o.state IN ('pending', 'retrying', 'held')
RETURNING o.id
"""

# `relay inspect`: a customer's newest %(limit)s messages with every attempt that carried
# them, newest first. Index: relay_outbox_customer_key_idx for the messages, then
# relay_attempt_message_ids_idx (GIN, @>) per message. Locks: none.
HISTORY_FOR_CUSTOMER: Final = """
SELECT id, message_id, customer_key, project_id, event_id, event_type, kind, state, attempts,
       created_at, updated_at, delivered_at, last_error, coalesced_into, requeued_by,
       requeued_at, attempt_id, started_at, status_code, outcome, attempt_error, latency_ms,
       relay_instance
FROM relay_message_history
WHERE id IN (SELECT id FROM relay_outbox WHERE customer_key = %(customer)s
             ORDER BY id DESC LIMIT %(limit)s)
ORDER BY id DESC, started_at DESC NULLS LAST, attempt_id DESC
"""

# How many messages a customer has in all. Index: relay_outbox_customer_key_idx (index-only
# scan when the visibility map allows). Locks: none.
OUTBOX_COUNT_CUSTOMER: Final = """
SELECT count(*) FROM relay_outbox WHERE customer_key = %(customer)s
"""

# The retention cutoff, fixed once per purge from the database clock. Locks: none.
RETENTION_CUTOFF: Final = "SELECT now() - %(older_than_s)s * interval '1 second'"

# One window of the message purge: the next %(batch)s rows after id %(after)s, of which the
# finished ones (%(states)s) last changed before %(cutoff)s are deleted. Returns the window's
# last id (the next %(after)s, NULL at the end of the table), its oldest created_at (the purge
# stops once a whole window was written after the cutoff: ids follow write order, so nothing
# further can be old enough) and the number deleted.
# A coalesced row is kept while the message now carrying its traits (followed through further
# coalescing) is not finished: its content has not reached Customer.io yet. The DELETE checks
# state and age again on the row it locks, so a row an operator re-queued meanwhile survives.
# Whole days go first, by PARTITIONS_DROP; this walk deletes what is left older than the
# cutoff row by row: the DEFAULT partition's rows and the finished rows of days kept for an
# unfinished or dead one.
# Index: primary key (one bounded range per window). Locks: row locks on the deleted rows, for
# this statement only (autocommit: one short transaction per window).
OUTBOX_PURGE_WINDOW: Final = """
WITH win AS (
    SELECT id, occurred_at, state, updated_at, created_at, coalesced_into FROM relay_outbox
    WHERE id > %(after)s
    ORDER BY id
    LIMIT %(batch)s
), doomed AS (
    SELECT w.id, w.occurred_at FROM win w
    WHERE w.state = ANY(%(states)s::text[])
      AND w.updated_at < %(cutoff)s
      AND NOT (w.state = 'coalesced' AND EXISTS (
          WITH RECURSIVE carrier(id, state, into_id, depth) AS (
              SELECT c.id, c.state, c.coalesced_into, 1
              FROM relay_outbox c WHERE c.id = w.coalesced_into
              UNION ALL
              SELECT c.id, c.state, c.coalesced_into, carrier.depth + 1
              FROM carrier JOIN relay_outbox c ON c.id = carrier.into_id
              WHERE carrier.state = 'coalesced' AND carrier.depth < 32
          )
          SELECT 1 FROM carrier
          WHERE carrier.state <> 'coalesced' AND NOT carrier.state = ANY(%(states)s::text[])
      ))
), gone AS (
    DELETE FROM relay_outbox m
    WHERE m.id = ANY(ARRAY(SELECT id FROM doomed))
      AND m.occurred_at >= (SELECT min(occurred_at) FROM doomed)
      AND m.occurred_at <= (SELECT max(occurred_at) FROM doomed)
      AND m.state = ANY(%(states)s::text[])
      AND m.updated_at < %(cutoff)s
    RETURNING m.id
)
SELECT (SELECT max(id) FROM win) AS last_id,
       (SELECT min(created_at) FROM win) AS oldest_written,
       (SELECT count(*) FROM gone) AS deleted
"""

# One batch of the attempt purge: the oldest %(batch)s attempts after (%(after_t)s,
# %(after_id)s) started before %(cutoff)s, deleted whatever their messages' states (an attempt
# row is audit, nothing reads it to deliver). Keyset on (started_at, id), so each batch starts
# where the last one ended instead of stepping over the index entries it just deleted.
# Returns the batch's last key (NULL when none was left) and the number deleted.
# Index: relay_attempt_started_at_idx (range started_at >= %(after_t)s AND < %(cutoff)s).
# Locks: row locks on the deleted rows, for this statement only.
ATTEMPT_PURGE_BATCH: Final = """
WITH batch AS (
    SELECT id, started_at FROM relay_attempt
    WHERE started_at < %(cutoff)s::timestamptz
      AND started_at >= %(after_t)s::timestamptz
      AND (started_at, id) > (%(after_t)s::timestamptz, %(after_id)s::bigint)
    ORDER BY started_at, id
    LIMIT %(batch)s
), gone AS (
    DELETE FROM relay_attempt a WHERE a.id = ANY(ARRAY(SELECT id FROM batch)) RETURNING a.id
), last AS (
    SELECT started_at, id FROM batch ORDER BY started_at DESC, id DESC LIMIT 1
)
SELECT (SELECT started_at FROM last) AS last_t,
       (SELECT id FROM last) AS last_id,
       (SELECT count(*) FROM gone) AS deleted
"""

# --- partitions (migration relay_0006) --------------------------------------------------------

# Create the partitions of today and the next %(ahead_days)s UTC days, for the outbox and the
# attempt log, moving rows of those days out of the DEFAULT partition. A SECURITY DEFINER
# function: relay_worker may run it without owning the tables. Returns how many it created.
# Index: catalog. Locks: SHARE UPDATE EXCLUSIVE on the parent and ACCESS EXCLUSIVE on its
# DEFAULT partition, only while a partition is attached (lock_timeout 2 s, then it gives up).
PARTITIONS_ENSURE: Final = "SELECT relay_partitions_ensure(%(ahead_days)s)"

# Retention's fast part: drop the day partitions wholly older than %(cutoff)s whose rows are all
# finished (dead ones too, with %(include_dead)s), and the attempt log's days older than it.
# Returns each dropped partition and its estimated rows. The cost is a catalog change,
# whatever a day held. Index: each candidate day's partial unfinished and dead indexes (the
# check). Locks: ACCESS EXCLUSIVE on relay_outbox, then relay_attempt, for the drops
# (lock_timeout 1 s: a long transaction on the outbox makes it give up rather than queue every
# insert and claim behind it).
PARTITIONS_DROP: Final = """
SELECT partition_name, estimated_rows
FROM relay_partitions_drop(%(cutoff)s::timestamptz, %(include_dead)s::boolean)
"""

# One step of raising the claim's floor (relay_outbox_floor_advance: publish, note the running
# transactions, raise once they have ended). Autocommit: each step must be its own
# transaction. Returns the step taken. Index: each day's partial unfinished index (EXISTS).
# Locks: the floor row, FOR UPDATE, for the call.
FLOOR_ADVANCE: Final = "SELECT relay_outbox_floor_advance()"

# The floor now (tests, bench); NULL while it is -infinity (nothing raised it yet, so no day is
# skipped). Index: primary key. Locks: none.
FLOOR_READ: Final = """
SELECT CASE WHEN isfinite(unfinished_from) THEN unfinished_from END FROM relay_outbox_floor
"""

# The floor as the claim's %(floor)s takes it: text, which -infinity (the floor before its
# first raise) is too (psycopg loads no infinite timestamp into a datetime); and whether it is
# below the value the claim passed. Read when a claim took nothing: nothing was due, or a late
# insert lowered the floor and the claim's gate refused the stale value. Index: primary key.
# Locks: none.
FLOOR_NOW: Final = f"""
SELECT unfinished_from::text, unfinished_from < {FLOOR_HINT} FROM relay_outbox_floor
"""

# --- vacuum (relay's own fallback) ------------------------------------------------------------

# Dead tuples in the outbox's partitions, and how long since the one with dead tuples vacuumed
# longest ago was (infinite when one never was).
# Every claim and mark leaves a dead tuple, and the claim scans past them in its partial index until
# a vacuum clears them: with autovacuum off or behind, claim time grows with the backlog's churn.
# Index: none (statistics view). Locks: none.
OUTBOX_VACUUM_STATS: Final = """
SELECT coalesce(sum(n_dead_tup), 0)::bigint,
       CASE WHEN bool_or(last_vacuum IS NULL AND last_autovacuum IS NULL)
                 FILTER (WHERE n_dead_tup > 0)
            THEN 'Infinity'::float8
            ELSE extract(epoch FROM now() - min(greatest(last_vacuum, last_autovacuum))
                                            FILTER (WHERE n_dead_tup > 0))::float8
       END AS since_s,
       current_setting('autovacuum')::bool AS autovacuum
FROM pg_stat_user_tables
WHERE relid IN (SELECT relid FROM pg_partition_tree('relay_outbox') WHERE isleaf)
"""

# One relay at a time vacuums (the others skip): a session-level advisory lock, released after.
# Locks: advisory lock 'relay_outbox_vacuum' (hashtext), no table lock.
OUTBOX_VACUUM_TRY_LOCK: Final = "SELECT pg_try_advisory_lock(hashtext('relay_outbox_vacuum'))"
OUTBOX_VACUUM_UNLOCK: Final = "SELECT pg_advisory_unlock(hashtext('relay_outbox_vacuum'))"

# Plain VACUUM (not FULL): takes SHARE UPDATE EXCLUSIVE, which blocks neither the application's
# inserts nor the relays' claims; SKIP_LOCKED gives up at once if another vacuum holds it.
# Needs autocommit (VACUUM cannot run in a transaction) and ownership of the table.
OUTBOX_VACUUM: Final = "VACUUM (SKIP_LOCKED) relay_outbox"

# --- the demo (relay demo) --------------------------------------------------------------------

# The demo's rows are the outbox rows whose event id starts with %(prefix)s (relay.demo.funnels:
# EVENT_PREFIX, with a trailing '%'). No index serves event_id: the demo runs on an outbox of
# its own, or one that holds only finished messages of others (--force), and scans it.

# Other sessions of relays on this database (relay.db names them "relay <purpose> ..."), their
# names in one text ('' when none): such a relay would deliver the demo's messages to a real
# workspace. Run without parameters, so its '%' is a LIKE wildcard as written.
# Index: none (pg_stat_activity reads shared memory). Locks: none.
SESSION_DEMO_OTHER_RELAYS: Final = """
SELECT coalesce(string_agg(DISTINCT application_name, ', '), '')
FROM pg_stat_activity
WHERE datname = current_database()
  AND pid <> pg_backend_pid()
  AND application_name LIKE 'relay %'
"""

# Messages that are not the demo's: how many are still unfinished, and how many in all.
# Index: none (sequential scan of relay_outbox). Locks: none.
OUTBOX_DEMO_COUNT_OTHERS: Final = f"""
SELECT count(*) FILTER (WHERE state IN {UNFINISHED}) AS unfinished, count(*) AS total
FROM relay_outbox
WHERE event_id NOT LIKE %(prefix)s
"""

# Delete an earlier run's rows, and the attempts that carried them, in one statement: otherwise
# the run's event ids would map to the same messageIds and be skipped as duplicates.
# Index: none for relay_outbox (sequential scan); relay_attempt_message_ids_idx (GIN, &&) for
# the attempts. Locks: row locks on the deleted rows.
OUTBOX_DEMO_DELETE: Final = """
WITH gone AS (DELETE FROM relay_outbox WHERE event_id LIKE %(prefix)s RETURNING id)
DELETE FROM relay_attempt WHERE message_ids && ARRAY(SELECT id FROM gone)
"""

# The demo's rows as the report shows them, in write order.
# Index: none (sequential scan of relay_outbox). Locks: none.
OUTBOX_DEMO_ROWS: Final = """
SELECT id, message_id, event_id, kind, customer_key, event_type, state, attempts,
       coalesced_into, last_error
FROM relay_outbox
WHERE event_id LIKE %(prefix)s
ORDER BY id
"""

# Every request that carried one of the messages %(ids)s (bigint[]), in the order recorded.
# Index: relay_attempt_message_ids_idx (GIN, &&). Locks: none.
ATTEMPT_DEMO_ROWS: Final = """
SELECT status_code, outcome, error, message_count, message_ids
FROM relay_attempt
WHERE message_ids && %(ids)s::bigint[]
ORDER BY id
"""
