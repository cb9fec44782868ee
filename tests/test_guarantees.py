"""One test per reported break of the delivery guarantees (issue: "Delivery you can trust").

Each reproduces the report with the numbers it gave (compressed in time through settings where
the report ran for minutes) and checks the promise, not the mechanism.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import psycopg
import pytest

from relay.retry import RetryPolicy, decide
from relay.service import drain
from relay.settings import Settings
from relay.testing.fakecio import FakeCustomerIO
from tests import invariants
from tests.rawfake import RawFake, trickle_body
from tests.relay_helpers import (
    KEY,
    funnel_event,
    make_relay,
    query,
    relay_env,
    states,
    write_events,
)


def snapshot(dsn: str) -> list[invariants.Written]:
    with psycopg.connect(dsn) as conn:
        return invariants.read_written(conn)


def execute(dsn: str, sql: str) -> None:
    with psycopg.connect(dsn) as conn:
        conn.execute(sql)


# --- 1. tracks before the identify after a retry ---------------------------------------------


@pytest.mark.parametrize("fault", ["503", "drop", "slow"])
def test_after_a_failed_request_the_identify_still_arrives_before_every_track(
    dsn: str, cio: FakeCustomerIO, fault: str
) -> None:
    # Four events of a new customer; the first request fails, then the server is healthy.
    # Reported: the accepted request was track0, track1, track2, identify, track3.
    write_events(dsn, [funnel_event("cus_new", n) for n in range(4)])
    written = snapshot(dsn)
    cio.slow_s = 0.6
    cio.script([fault])
    relay = make_relay(dsn, cio, http_timeout_s=0.3, lease_s=2.0)
    ok, _ = drain(relay, 20.0)
    assert ok, states(dsn)
    first = [i for i in cio.accepted_items() if i["userId"] == "cus_new"]
    assert first[0]["type"] == "identify" and first[0]["traits"]["email"], first
    verdict = invariants.check(written, cio.accepted_items())
    assert not verdict.track_before_identify and not verdict.order_violations, verdict.summary()


def test_identify_first_survives_any_number_of_failed_rounds(dsn: str, cio: FakeCustomerIO) -> None:
    # New events arrive between failed rounds: each claim merges fresh identifies again.
    relay = make_relay(dsn, cio)
    written: list[invariants.Written] = []
    for n in range(6):
        write_events(dsn, [funnel_event("cus_r", n), funnel_event("cus_s", n)])
        cio.script(["500"])
        relay.deliver_once()
        execute(dsn, "UPDATE relay_outbox SET next_attempt_at = now() WHERE state = 'retrying'")
    written = snapshot(dsn)
    ok, _ = drain(relay, 20.0)
    assert ok, states(dsn)
    verdict = invariants.check(written, cio.accepted_items())
    assert verdict.ok, verdict.summary()
    assert not verdict.track_before_identify, verdict.summary()


# --- 2. one malformed row stops all delivery -------------------------------------------------

POISON_BODIES = {
    "array": "[1, 2]",
    "null": "null",
    "string": '"identify"',
    "number": "42",
    "empty object": "{}",
    "traits not an object": '{"type": "identify", "userId": "cus_p", "traits": [1]}',
    "no userId": '{"type": "identify", "traits": {"a": 1}}',
    "wrong type": '{"type": "track", "userId": "cus_p", "event": "x"}',
    "bad timestamp": '{"type": "identify", "userId": "cus_p", "traits": {"a": 1},'
    ' "timestamp": "yesterday"}',
}


def insert_raw(dsn: str, message_id: str, kind: str, customer: str, body: str) -> None:
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "INSERT INTO relay_outbox (message_id, event_id, kind, customer_key, event_type,"
            " body, occurred_at) VALUES (%s, %s, %s, %s, 'user.registered', %s::jsonb, now())",
            (message_id, message_id, kind, customer, body),
        )
        conn.commit()


@pytest.mark.parametrize("name", sorted(POISON_BODIES))
def test_a_malformed_row_affects_only_its_own_message(
    dsn: str, cio: FakeCustomerIO, name: str
) -> None:
    # A valid identify, then the poison identify, then more of the same customer, and others.
    write_events(dsn, [funnel_event("cus_p", 0)])
    insert_raw(dsn, "poison-1", "identify", "cus_p", POISON_BODIES[name])
    write_events(dsn, [funnel_event("cus_p", 1)] + [funnel_event(f"cus_{i}", 0) for i in range(5)])
    relay = make_relay(dsn, cio)
    ok, _ = drain(relay, 20.0)
    assert ok, states(dsn)
    dead = query(dsn, "SELECT message_id, last_error FROM relay_outbox WHERE state = 'dead'")
    assert [d[0] for d in dead] == ["poison-1"], dead
    assert dead[0][1], "a dead message names its reason"
    assert states(dsn).keys() <= {"delivered", "coalesced", "dead"}
    # Counted where the dead-message alert looks, like a message Customer.io rejected.
    labels = {"destination": "default", "event": "user.registered", "kind": "identify"}
    dead_count = relay.metrics.registry.get_sample_value(
        "relay_messages_total", {**labels, "outcome": "dead"}
    )
    assert dead_count == 1
    accepted = set(cio.accepted_message_ids())
    for (mid,) in query(dsn, "SELECT message_id FROM relay_outbox WHERE state = 'delivered'"):
        assert mid in accepted


def test_relay_run_drain_survives_a_json_array_identify(dsn: str, cio: FakeCustomerIO) -> None:
    # Reported: `relay run --drain` exited 1 with AttributeError ('list' has no 'get').
    write_events(dsn, [funnel_event("cus_p", 0)])
    insert_raw(dsn, "poison-arr", "identify", "cus_p", "[1, 2]")
    write_events(dsn, [funnel_event("cus_p", 1), funnel_event("cus_q", 0)])
    proc = subprocess.run(
        [sys.executable, "-m", "relay.cli", "run", "--drain", "--timeout", "30"],
        env=relay_env(dsn, cio.url),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    dead = query(dsn, "SELECT message_id, last_error FROM relay_outbox WHERE state = 'dead'")
    assert [d[0] for d in dead] == ["poison-arr"]
    assert "array" in dead[0][1], dead
    assert states(dsn).keys() <= {"delivered", "coalesced", "dead"}


# jsonb stores what Python's json module cannot read back: nesting past its recursion limit
# (about 1,000 levels), an integer past its 4,300-digit conversion limit (jsonb prints 1e5000
# as 5,001 digits); and a decimal past a float's range, read as inf, which JSON cannot write.
UNREADABLE_BODIES = {
    "nested 3,000 levels": '{"type": "identify", "userId": "cus_p", "traits": '
    + '{"a": ' * 3000
    + "1"
    + "}" * 3000
    + "}",
    "a 5,001-digit integer": '{"type": "identify", "userId": "cus_p", "traits": {"n": 1e5000}}',
}


def test_a_body_the_relay_cannot_read_affects_only_its_own_message(
    dsn: str, cio: FakeCustomerIO
) -> None:
    # Each unreadable identify sits between valid identifies and tracks of its customer, with
    # other customers before and after it in the same claims. Reported: the parse raised, the
    # error escaped the planner, and every claim that took the row failed for everyone.
    write_events(dsn, [funnel_event("cus_p", 0), funnel_event("cus_a", 0)])
    for name, body in UNREADABLE_BODIES.items():
        insert_raw(dsn, name, "identify", "cus_p", body)
        write_events(dsn, [funnel_event("cus_p", len(name))])
    # Valid on its own, but merged with the next identify it would carry inf: sent unmerged.
    insert_raw(
        dsn,
        "huge-decimal",
        "identify",
        "cus_q",
        '{"type": "identify", "userId": "cus_q", "traits": {"big": 1'
        + "0" * 400
        + '.5}, "timestamp": "2026-11-28T09:00:00Z", "messageId": "huge-decimal"}',
    )
    write_events(dsn, [funnel_event("cus_q", 0)] + [funnel_event(f"cus_{i}", 0) for i in range(5)])
    relay = make_relay(dsn, cio)
    ok, _ = drain(relay, 20.0)
    assert ok, states(dsn)
    dead = dict(query(dsn, "SELECT message_id, last_error FROM relay_outbox WHERE state = 'dead'"))
    assert set(dead) == set(UNREADABLE_BODIES), dead
    assert "nested 3001 levels deep" in dead["nested 3,000 levels"]
    assert "5001 digits" in dead["a 5,001-digit integer"]
    assert states(dsn).keys() <= {"delivered", "coalesced", "dead"}
    accepted = set(cio.accepted_message_ids())
    delivered = query(dsn, "SELECT message_id FROM relay_outbox WHERE state = 'delivered'")
    assert {mid for (mid,) in delivered} <= accepted
    # Every customer got its messages: the identifies, merged or not, and every track.
    items = cio.accepted_items()
    for customer in ["cus_p", "cus_a", "cus_q"] + [f"cus_{i}" for i in range(5)]:
        mine = [i["type"] for i in items if i["userId"] == customer]
        assert mine and mine[0] == "identify", (customer, mine)
        assert "track" in mine, (customer, mine)
    q_identifies = [i for i in items if i["userId"] == "cus_q" and i["type"] == "identify"]
    assert len(q_identifies) == 2, q_identifies
    assert "huge-decimal" in accepted


# --- 3. healthy relays send the same rows twice ----------------------------------------------


def test_a_relay_whose_lease_was_taken_records_nothing_on_the_new_claim(
    dsn: str, cio: FakeCustomerIO
) -> None:
    # Same instance name on both sides (a restarted relay keeps its name): only a per-claim
    # token tells the old claim's outcome from the new one's.
    write_events(dsn, [funnel_event("cus_l", 0)])
    cio.latency_s = 1.0
    old = make_relay(dsn, cio, lease_s=3.0, http_timeout_s=2.0)
    new = make_relay(dsn, cio, lease_s=3.0, http_timeout_s=2.0)
    t = threading.Thread(target=old.deliver_once)
    t.start()
    assert cio.wait_for(lambda: cio.requests_arrived >= 1, timeout=5)
    # The old claim's lease runs out while its request is in flight; another claim takes over.
    execute(dsn, "UPDATE relay_outbox SET lease_expires_at = now() - interval '1 second'")
    new.rescue()
    cio.latency_s = 0.0
    new.deliver_once()
    t.join()
    old.close()
    new.close()
    # The new claim recorded delivery; the old one's late outcome touched nothing of it.
    rows = query(dsn, "SELECT state, attempts FROM relay_outbox ORDER BY id")
    assert [r[0] for r in rows] == ["delivered", "delivered"]


COMPRESSED = {
    "RELAY_LEASE_SECONDS": "3",
    "RELAY_HTTP_TIMEOUT": "2",
    "RELAY_BATCH_SIZE": "10",
    "RELAY_CONCURRENCY": "2",
}


@pytest.mark.parametrize(
    ("relays", "env", "latency_s", "customers", "events"),
    [
        # The report's two-relay run: a 1.8 s server, lease 3 s, timeout 2 s.
        pytest.param(2, COMPRESSED, 1.8, 40, 5, id="two-relays-compressed"),
        # One relay, the same settings: its own rescue used to take its queued chains.
        pytest.param(1, COMPRESSED, 1.8, 20, 8, id="one-relay-compressed"),
        # Every default (lease 30 s, timeout 10 s, batch 100, concurrency 4) and a server
        # answering just under the timeout: one claim's chains queue for about 45 s.
        pytest.param(1, {}, 9.0, 100, 17, id="one-relay-defaults", marks=pytest.mark.slow),
        # The report's single relay: every default and a server answering in 2.5 s; one
        # claim (100 customers x 100 rows) has about 50 batches, 13 rounds of 4 threads.
        pytest.param(1, {}, 2.5, 100, 50, id="one-relay-defaults-2.5s", marks=pytest.mark.slow),
    ],
)
def test_healthy_relays_with_a_slow_server_send_nothing_twice(
    dsn: str, relays: int, env: dict[str, str], latency_s: float, customers: int, events: int
) -> None:
    # More chains per claim than sending threads, so chains wait behind others for longer
    # than the lease: only renewal keeps them ours.
    with FakeCustomerIO(write_keys={KEY}, latency_s=latency_s) as cio:
        write_events(
            dsn, [funnel_event(f"cus_{c}", n) for c in range(customers) for n in range(events)]
        )
        written = snapshot(dsn)
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "relay.cli", "run"],
                env=relay_env(dsn, cio.url, RELAY_INSTANCE=f"r{i}", **env),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i in range(relays)
        ]
        try:
            deadline = time.monotonic() + 150
            while time.monotonic() < deadline:
                left = query(
                    dsn,
                    "SELECT count(*) FROM relay_outbox"
                    " WHERE state NOT IN ('delivered', 'coalesced')",
                )[0][0]
                if left == 0:
                    break
                time.sleep(0.3)
        finally:
            for p in procs:
                p.terminate()
            errs = [p.communicate(timeout=60)[1] for p in procs]
        assert left == 0, states(dsn)
        verdict = invariants.check(written, cio.accepted_items())
        rescued = query(dsn, "SELECT count(*) FROM relay_outbox WHERE last_error LIKE 'lease%'")
        assert verdict.duplicates == 0, (verdict.summary(), rescued, errs[0][-1500:])
        assert rescued == [(0,)]
        assert verdict.ok, verdict.summary()
        assert not invariants.final_profiles(written, cio.accepted_items())


# --- 4. the HTTP timeout is one deadline ----------------------------------------------------


def test_a_200_whose_body_trickles_is_delivered_once_within_the_deadline(dsn: str) -> None:
    # Reported: a server that sends 200 and then trickles the body one byte per 1.5 s held each
    # request 15 s with a 2 s timeout; the rows stayed retrying and were re-sent forever.
    write_events(dsn, [funnel_event(f"cus_{i}", 0) for i in range(3)])
    with RawFake(trickle_body(1.5, length=10)) as server:
        started = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "relay.cli", "run", "--drain", "--timeout", "60"],
            env=relay_env(dsn, server.url, RELAY_HTTP_TIMEOUT="2", RELAY_LEASE_SECONDS="6"),
            capture_output=True,
            text=True,
            timeout=90,
        )
        took = time.monotonic() - started
        bodies = server.bodies
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert states(dsn) == {"delivered": 6}
    assert len(bodies) == 1, f"{len(bodies)} requests"
    assert took < 30, f"{took:.1f}s"
    outcome = query(dsn, "SELECT outcome, status_code, latency_ms FROM relay_attempt")
    assert [(o, c) for o, c, _ in outcome] == [("delivered", 200)]
    assert outcome[0][2] < 4000  # the request ended at its 2 s deadline, not after 15 s


# --- 5. outages make messages dead in minutes ------------------------------------------------


def test_transient_failures_never_make_a_message_dead_before_the_age_limit() -> None:
    # The default policy, a message failing every attempt: simulate the schedule it would get.
    s = Settings()
    policy = RetryPolicy(
        base_s=s.backoff_base_s,
        cap_s=s.backoff_cap_s,
        max_age_s=s.max_age_s,
        retry_after_cap_s=s.retry_after_cap_s,
    )
    age, attempt = 0.0, 0
    while True:
        attempt += 1
        d = decide(attempt, age, None, policy, rand=0.999999)
        if d.dead:
            break
        age += d.delay_s
    assert age >= s.max_age_s, f"dead after {attempt} attempts at {age:.0f}s"
    # ...and the backoff stays within minutes, so recovery after the outage is quick.
    assert decide(attempt - 1, 0.0, None, policy, rand=0.999999).delay_s <= s.backoff_cap_s


def test_a_long_outage_kills_nothing_and_recovers(dsn: str, cio: FakeCustomerIO) -> None:
    # Thirty failed rounds (far past the old 12-attempt limit), then Customer.io is back.
    write_events(dsn, [funnel_event(f"cus_{i}", 0) for i in range(3)])
    cio.set_fault_rates({"503": 1.0}, seed=3)
    relay = make_relay(dsn, cio)
    for _ in range(30):
        relay.deliver_once()
        execute(dsn, "UPDATE relay_outbox SET next_attempt_at = now() WHERE state = 'retrying'")
    assert states(dsn) == {"retrying": 6}
    cio.set_fault_rates({}, seed=3)
    ok, _ = drain(relay, 20.0)
    assert ok and states(dsn) == {"delivered": 6}


def test_a_message_older_than_the_age_limit_is_dead_with_that_reason(
    dsn: str, cio: FakeCustomerIO
) -> None:
    write_events(dsn, [funnel_event("cus_old", 0)])
    execute(dsn, "UPDATE relay_outbox SET created_at = now() - interval '2 hours'")
    cio.script(["503"])
    relay = make_relay(dsn, cio, max_age_s=3600.0)
    relay.deliver_once()
    relay.close()
    rows = query(dsn, "SELECT DISTINCT state, last_error FROM relay_outbox")
    assert len(rows) == 1 and rows[0][0] == "dead" and "age" in rows[0][1]


# --- 6. a 429 slows the whole destination ----------------------------------------------------


def test_a_429_pauses_every_customer_of_the_destination(dsn: str, cio: FakeCustomerIO) -> None:
    # Two customers in two chains, one sending thread: the second chain's request must wait
    # for the Retry-After the first one got.
    cio.retry_after_s = 1
    cio.script(["429"])
    write_events(dsn, [funnel_event("cus_a", 0), funnel_event("cus_b", 0)])
    relay = make_relay(dsn, cio, batch_size=2, concurrency=1)
    t0 = time.monotonic()
    relay.deliver_once()
    relay.close()
    assert len(cio.requests) == 2, cio.requests
    gap = cio.requests[1].received_at - cio.requests[0].received_at
    assert gap >= 0.9, f"the next request went out {gap:.2f}s after the 429"
    assert time.monotonic() - t0 < 10


def test_a_429_seen_by_one_relay_pauses_the_others(dsn: str, cio: FakeCustomerIO) -> None:
    cio.retry_after_s = 2
    cio.script(["429"])
    write_events(dsn, [funnel_event("cus_a", 0)])
    first = make_relay(dsn, cio)
    first.deliver_once()
    first.close()
    write_events(dsn, [funnel_event("cus_b", 0)])
    second = make_relay(dsn, cio, instance="other-relay")
    second.deliver_once()
    second.close()
    assert len(cio.requests) == 2
    gap = cio.requests[1].received_at - cio.requests[0].received_at
    assert gap >= 1.8, f"another relay sent {gap:.2f}s after the 429 asked for 2 s"
