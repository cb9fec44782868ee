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

# --- the application's write path -----------------------------------------------------------

# Write one event's messages (identify, then track) in one statement, in write order: identity
# values follow ORDER BY ord, so id order is write order within the event.
# Index: relay_outbox_message_id_key (ON CONFLICT: a re-recorded event writes nothing).
# Locks: row locks on the inserted rows only; a concurrent insert of the same messageId waits
# for the first transaction and then skips. Fires the NOTIFY trigger once per statement.
OUTBOX_INSERT_MESSAGES: Final = """
INSERT INTO relay_outbox
    (message_id, event_id, kind, customer_key, project_id, event_type, body, occurred_at)
SELECT m.message_id, m.event_id, m.kind, m.customer_key, m.project_id, m.event_type,
       m.body::jsonb, m.occurred_at::timestamptz
FROM unnest(%(message_ids)s::text[], %(event_ids)s::text[], %(kinds)s::text[],
            %(customer_keys)s::text[], %(project_ids)s::text[], %(event_types)s::text[],
            %(bodies)s::text[], %(occurred_ats)s::text[])
     WITH ORDINALITY AS m(message_id, event_id, kind, customer_key, project_id, event_type,
                          body, occurred_at, ord)
ORDER BY m.ord
ON CONFLICT (message_id) DO NOTHING
RETURNING message_id
"""

# --- claiming ---------------------------------------------------------------------------------

# The relay's bookkeeping (claims, marks, attempt rows) commits without waiting for the WAL
# flush: a database crash forgets at most the last few hundred milliseconds of marks, and those
# messages are sent again under the same messageId, inside the at-least-once contract. The
# application's own writes stay fully durable; this is set on the relay's connections only.
SESSION_ASYNC_COMMIT: Final = "SET synchronous_commit = off"

# Lock the first due row of up to %(customers)s customers whose earlier messages are all
# finished. A row with an earlier unfinished row of the same customer (pending, in flight
# elsewhere, waiting for a retry, held) is not a head, so no relay can send a customer's later
# message before an earlier one is done; a customer waiting for a retry holds up only itself.
# Race: a head another relay is claiming right now is row-locked (SKIP LOCKED passes over it)
# and its followers fail NOT EXISTS against it in our snapshot, so one claim owns a customer.
# Index: relay_outbox_due_idx (partial: state IN pending/retrying, ordered by next_attempt_at,
# id) for the scan; relay_outbox_customer_unfinished_idx for the NOT EXISTS probe.
# Locks: FOR UPDATE on the returned rows, skipping rows locked by other relays.
OUTBOX_CLAIM_HEADS: Final = """
SELECT m.id, m.customer_key
FROM relay_outbox m
WHERE m.state IN ('pending', 'retrying')
  AND m.next_attempt_at <= now()
  AND NOT EXISTS (
      SELECT 1 FROM relay_outbox e
      WHERE e.customer_key = m.customer_key
        AND e.id < m.id
        AND e.state IN ('pending', 'retrying', 'in_flight', 'held'))
ORDER BY m.next_attempt_at, m.id
LIMIT %(customers)s
FOR UPDATE OF m SKIP LOCKED
"""

# For each claimed head, the customer's unfinished rows from the head on, in write order, at
# most %(per_customer)s each. The caller keeps the prefix that is due (it stops at the first
# row that is held, in flight or waiting for a later retry).
# Index: relay_outbox_customer_unfinished_idx (customer_key, id), one range scan per customer.
# Locks: FOR UPDATE on those rows. Nobody else can be claiming them (their head is ours), so
# this only waits for an operator command touching the same rows.
OUTBOX_CLAIM_FOLLOWERS: Final = """
SELECT o.id, o.customer_key, o.kind, o.project_id, o.body, o.attempts, o.state,
       o.next_attempt_at <= now() AS due,
       extract(epoch FROM now() - o.created_at)::float8 AS age_s
FROM unnest(%(head_ids)s::bigint[], %(customer_keys)s::text[]) AS h(id, customer_key)
CROSS JOIN LATERAL (
    SELECT * FROM relay_outbox o
    WHERE o.customer_key = h.customer_key
      AND o.id >= h.id
      AND o.state IN ('pending', 'retrying', 'in_flight', 'held')
    ORDER BY o.id
    LIMIT %(per_customer)s
    FOR UPDATE
) AS o
ORDER BY o.customer_key, o.id
"""

# Take the claimed rows: in flight under our lease. Index: primary key. Locks: already held.
OUTBOX_MARK_IN_FLIGHT: Final = """
UPDATE relay_outbox
SET state = 'in_flight', lease_owner = %(owner)s,
    lease_expires_at = now() + %(lease_s)s * interval '1 second', updated_at = now()
WHERE id = ANY(%(ids)s::bigint[])
"""

# Merged-away identifies: finished, pointing at the row whose identify carried their traits.
# Index: primary key. Locks: already held (claimed in the same transaction).
OUTBOX_MARK_COALESCED: Final = """
UPDATE relay_outbox o
SET state = 'coalesced', coalesced_into = c.into_id, lease_owner = NULL,
    lease_expires_at = NULL, updated_at = now()
FROM unnest(%(ids)s::bigint[], %(into_ids)s::bigint[]) AS c(id, into_id)
WHERE o.id = c.id
"""

# The carrier of a merged identify stores what is sent, so a retry re-sends the merged body
# under the same messageId. Index: primary key. Locks: already held.
OUTBOX_REWRITE_BODIES: Final = """
UPDATE relay_outbox o
SET body = b.body::jsonb, updated_at = now()
FROM unnest(%(ids)s::bigint[], %(bodies)s::text[]) AS b(id, body)
WHERE o.id = b.id
"""

# Rows that cannot be sent now (no destination, destination disabled or paused): held, with the
# reason, no attempt counted. Later rows of the customer wait behind them (order), other
# customers do not. Index: primary key. Locks: already held.
OUTBOX_MARK_HELD: Final = """
UPDATE relay_outbox
SET state = 'held', last_error = %(reason)s, lease_owner = NULL, lease_expires_at = NULL,
    updated_at = now()
WHERE id = ANY(%(ids)s::bigint[])
"""

# --- outcomes ---------------------------------------------------------------------------------

# Record the outcome of a request, row by row (delivered, retrying with its delay, dead, held).
# Only rows still in flight under our lease are touched: if our lease expired and another relay
# took them, its record wins and ours is dropped (the message went out twice, same messageId).
# Index: primary key. Locks: row locks on the updated rows, for the statement's transaction.
OUTBOX_RECORD_OUTCOMES: Final = """
UPDATE relay_outbox o
SET state = r.state,
    attempts = o.attempts + r.attempted,
    next_attempt_at = CASE WHEN r.state = 'retrying'
                           THEN now() + r.delay_s * interval '1 second'
                           ELSE o.next_attempt_at END,
    delivered_at = CASE WHEN r.state = 'delivered' THEN now() ELSE o.delivered_at END,
    last_error = r.error,
    lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
FROM unnest(%(ids)s::bigint[], %(states)s::text[], %(attempted)s::int[],
            %(delays)s::float8[], %(errors)s::text[]) AS r(id, state, attempted, delay_s, error)
WHERE o.id = r.id AND o.state = 'in_flight' AND o.lease_owner = %(owner)s
"""

# Hand back claimed rows that were not sent (shutdown, or an earlier row of the same customer
# failed in this cycle): no attempt counted; they keep their place in the customer's order.
# Index: primary key. Locks: row locks on the updated rows.
OUTBOX_RELEASE: Final = """
UPDATE relay_outbox
SET state = CASE WHEN attempts > 0 THEN 'retrying' ELSE 'pending' END,
    next_attempt_at = greatest(next_attempt_at, now() + %(delay_s)s * interval '1 second'),
    lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
WHERE id = ANY(%(ids)s::bigint[]) AND state = 'in_flight' AND lease_owner = %(owner)s
"""

# Keep a long cycle's remaining rows ours. Index: primary key. Locks: row locks.
OUTBOX_EXTEND_LEASE: Final = """
UPDATE relay_outbox
SET lease_expires_at = now() + %(lease_s)s * interval '1 second'
WHERE id = ANY(%(ids)s::bigint[]) AND state = 'in_flight' AND lease_owner = %(owner)s
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

# Rows whose relay died mid-cycle (lease expired): claimable again at once, by any relay. The
# attempt is counted, since the request may have reached Customer.io before the relay died.
# Index: relay_outbox_lease_idx (partial: in flight, by lease expiry). Locks: row locks.
OUTBOX_RESCUE_EXPIRED: Final = """
UPDATE relay_outbox
SET state = 'retrying', attempts = attempts + 1, next_attempt_at = now(),
    last_error = 'lease of relay ' || coalesce(lease_owner, '?')
                 || ' expired before it recorded an outcome',
    lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
WHERE state = 'in_flight' AND lease_expires_at < now()
RETURNING id
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

# Is anything left to deliver (for --drain)? Held rows are reported, not waited for.
# Index: relay_outbox_customer_unfinished_idx (partial on unfinished states). Locks: none.
OUTBOX_COUNT_ACTIVE: Final = """
SELECT count(*) FILTER (WHERE state IN ('pending', 'retrying', 'in_flight')) AS active,
       count(*) FILTER (WHERE state = 'held') AS held
FROM relay_outbox
WHERE state IN ('pending', 'retrying', 'in_flight', 'held')
"""

# Backlog figures for metrics: counts per unfinished state and the oldest unfinished row's age.
# Index: relay_outbox_customer_unfinished_idx. Locks: none.
OUTBOX_BACKLOG: Final = """
SELECT state, count(*) AS n, extract(epoch FROM now() - min(created_at))::float8 AS oldest_s
FROM relay_outbox
WHERE state IN ('pending', 'retrying', 'in_flight', 'held')
GROUP BY state
"""

# --- destinations -----------------------------------------------------------------------------

# All configured destinations (small table, read every few seconds). Index: seq scan. Locks: none.
DESTINATION_LIST: Final = """
SELECT project_id, region, api_url, write_key, enabled, paused_at, paused_reason
FROM relay_destination
ORDER BY project_id
"""

# A relay got 401/403 for this destination: stop sending until the key changes.
# Index: primary key. Locks: row lock on the destination.
DESTINATION_PAUSE: Final = """
UPDATE relay_destination SET paused_at = now(), paused_reason = %(reason)s, updated_at = now()
WHERE project_id = %(project_id)s AND write_key = %(write_key)s
"""

# --- wake-ups ---------------------------------------------------------------------------------

# Notification channel fired by the relay_outbox_notify trigger (see the first migration).
NOTIFY_CHANNEL: Final = "relay_outbox"
LISTEN: Final = "LISTEN relay_outbox"
