"""The relay against a real PostgreSQL and a real local Customer.io-compatible server."""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from typing import Any

import psycopg
import pytest

from relay import daemon, service
from relay.daemon import Relay
from relay.db import StatementFailed
from relay.errors import DatabaseUnavailable
from relay.service import drain
from relay.testing.fakecio import FakeCustomerIO
from tests.relay_helpers import (
    KEY,
    funnel_event,
    make_relay,
    query,
    states,
    wait_until,
    write_events,
)


def run_drain(relay: Relay, timeout: float = 20.0) -> None:
    ok, _ = drain(relay, timeout)
    assert ok, f"drain timed out; states: {states(relay.dsn)}"


def attempts(dsn: str) -> list[tuple[Any, ...]]:
    return query(
        dsn,
        "SELECT status_code, outcome, message_count, error FROM relay_attempt ORDER BY id",
    )


def test_ten_events_for_one_customer_send_one_identify_then_ten_tracks(
    dsn: str, cio: FakeCustomerIO
) -> None:
    write_events(dsn, [funnel_event("cus_1", n) for n in range(10)])
    run_drain(make_relay(dsn, cio))

    items = cio.accepted_items()
    assert [i["type"] for i in items] == ["identify"] + ["track"] * 10
    assert [i["properties"]["n"] for i in items[1:]] == list(range(10))
    identify = items[0]
    # traits merged key by key, newest value winning, with the newest timestamp
    assert identify["traits"]["name"] == "Name 9" and identify["traits"]["city"] == "City 9"
    assert identify["timestamp"] == "2026-11-28T10:00:09.000Z"
    assert len(cio.requests) == 1

    rows = query(
        dsn,
        "SELECT id, kind, state, coalesced_into, attempts, message_id FROM relay_outbox"
        " WHERE kind = 'identify' ORDER BY id",
    )
    carrier = [r for r in rows if r[2] == "delivered"]
    assert len(carrier) == 1 and carrier[0][0] == rows[0][0]  # the first identify carried it
    assert identify["messageId"] == carrier[0][5]
    merged = [r for r in rows if r[2] == "coalesced"]
    assert len(merged) == 9 and all(r[3] == carrier[0][0] for r in merged)
    assert states(dsn) == {"delivered": 11, "coalesced": 9}
    # the carrier row stores what was sent, so a retry would re-send the merged identify
    stored = query(dsn, "SELECT body FROM relay_outbox WHERE id = %s", (carrier[0][0],))[0][0]
    assert stored["traits"] == identify["traits"]


def test_delivered_batch_records_one_attempt_and_delivered_rows(
    dsn: str, cio: FakeCustomerIO
) -> None:
    write_events(dsn, [funnel_event(f"cus_{i}", 0) for i in range(30)])
    run_drain(make_relay(dsn, cio))
    assert states(dsn) == {"delivered": 60}
    assert attempts(dsn) == [(200, "delivered", 60, None)]
    row = query(
        dsn,
        "SELECT min(attempts), max(attempts), bool_and(delivered_at IS NOT NULL),"
        " bool_and(lease_owner IS NULL) FROM relay_outbox",
    )[0]
    assert row == (1, 1, True, True)
    # strict mode on every request, so Customer.io cannot 200-and-drop
    assert all(r.strict for r in cio.requests)


@pytest.mark.parametrize("fault", ["500", "503", "drop"])
def test_retryable_failure_is_retried_then_delivered(
    dsn: str, cio: FakeCustomerIO, fault: str
) -> None:
    write_events(dsn, [funnel_event("cus_1", 0)])
    cio.script([fault])
    run_drain(make_relay(dsn, cio))
    assert states(dsn) == {"delivered": 2}
    rows = attempts(dsn)
    assert [r[1] for r in rows] == ["retry", "delivered"]
    if fault == "drop":
        assert rows[0][0] is None and rows[0][3].startswith("protocol")
    else:
        assert rows[0][0] == int(fault)
    assert query(dsn, "SELECT DISTINCT attempts FROM relay_outbox") == [(2,)]


def test_429_honours_retry_after(dsn: str, cio: FakeCustomerIO) -> None:
    cio.retry_after_s = 2
    cio.script(["429"])
    write_events(dsn, [funnel_event("cus_1", 0)])
    relay = make_relay(dsn, cio)
    result = relay.deliver_once()
    assert result.retrying == 2
    delay = query(
        dsn,
        "SELECT min(extract(epoch FROM next_attempt_at - updated_at)) FROM relay_outbox",
    )[0][0]
    assert delay >= 1.9  # backoff alone would be at most 0.2 s here
    assert attempts(dsn)[0][:2] == (429, "retry")
    run_drain(relay)
    assert states(dsn) == {"delivered": 2}


def test_timeout_is_retried_and_a_duplicate_keeps_its_message_id(
    dsn: str, cio: FakeCustomerIO
) -> None:
    cio.slow_s = 1.0
    cio.script(["slow"])
    write_events(dsn, [funnel_event("cus_1", 0)])
    run_drain(make_relay(dsn, cio, http_timeout_s=0.3, lease_s=2.0))
    assert states(dsn) == {"delivered": 2}
    assert [r[1] for r in attempts(dsn)] == ["retry", "delivered"]
    assert attempts(dsn)[0][3].startswith("timeout")
    # the slow answer was stored by the server too: the retry is a duplicate, same messageIds
    assert cio.wait_for(lambda: len(cio.accepted_items()) == 4, timeout=5)
    ids = cio.accepted_message_ids()
    assert sorted(ids[:2]) == sorted(ids[2:])


def test_400_bisects_to_the_bad_message_and_delivers_the_rest(
    dsn: str, cio: FakeCustomerIO
) -> None:
    cio.reject = lambda item: (
        "property 'poison' is not allowed" if item.get("properties", {}).get("poison") else None
    )
    events = [funnel_event(f"cus_{i}", 0) for i in range(8)]
    events[5] = funnel_event("cus_5", 0, poison=True)
    write_events(dsn, events)
    run_drain(make_relay(dsn, cio))
    dead = query(dsn, "SELECT customer_key, kind, last_error FROM relay_outbox WHERE state='dead'")
    assert [(d[0], d[1]) for d in dead] == [("cus_5", "track")]
    assert "poison" in dead[0][2] and "400" in dead[0][2]
    assert states(dsn) == {"delivered": 15, "dead": 1}
    delivered_ids = set(cio.accepted_message_ids())
    assert len(delivered_ids) == 15
    outcomes = [r[1] for r in attempts(dsn)]
    assert outcomes.count("rejected") >= 2 and "delivered" in outcomes


def test_drain_does_not_wait_for_rows_queued_behind_a_held_row(
    dsn: str, cio: FakeCustomerIO
) -> None:
    # cus_0's first event goes to a project whose destination is disabled (held); its next
    # event, for the default destination, waits behind it (per-customer order). A drain reports
    # both with the held rows instead of waiting for the second until its timeout.
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "INSERT INTO relay_destination (project_id, region, write_key, enabled)"
            " VALUES ('prj_off', 'us', 'wk_off_0123456789', false)"
        )
    write_events(dsn, [funnel_event("cus_0", 0, project="prj_off")])
    write_events(dsn, [funnel_event("cus_0", 1), funnel_event("cus_1", 0)])
    started = time.monotonic()
    ok, _ = drain(make_relay(dsn, cio), 10.0)
    assert ok
    assert time.monotonic() - started < 8.0
    assert states(dsn) == {"held": 2, "pending": 2, "delivered": 2}


def test_401_pauses_the_default_destination_without_burning_retries(
    dsn: str, cio: FakeCustomerIO
) -> None:
    write_events(dsn, [funnel_event(f"cus_{i}", 0) for i in range(3)])
    relay = make_relay(dsn, cio, write_key="wrong-key-123456")
    ok, _ = drain(relay, 3.0)
    assert ok  # nothing is pending: the messages are held, visibly
    assert states(dsn) == {"held": 6}
    assert query(dsn, "SELECT DISTINCT attempts FROM relay_outbox") == [(0,)]
    reasons = query(dsn, "SELECT DISTINCT last_error FROM relay_outbox")
    assert "401" in reasons[0][0]
    assert [r[:2] for r in attempts(dsn)] == [(401, "unauthorized")]
    assert len(cio.requests) == 1  # paused: no further request was made


def test_401_on_a_table_destination_pauses_it_until_the_key_is_fixed(
    dsn: str, cio: FakeCustomerIO
) -> None:
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "INSERT INTO relay_destination (project_id, region, api_url, write_key)"
            " VALUES ('prj_eu', 'eu', %s, 'stale-key-0000')",
            (cio.url,),
        )
        conn.commit()
    write_events(dsn, [funnel_event("cus_eu", 0, project="prj_eu")])
    write_events(dsn, [funnel_event("cus_us", 0)])
    relay = make_relay(dsn, cio)
    drain(relay, 3.0)
    assert query(dsn, "SELECT customer_key, state FROM relay_outbox ORDER BY id") == [
        ("cus_eu", "held"),
        ("cus_eu", "held"),
        ("cus_us", "delivered"),
        ("cus_us", "delivered"),
    ]
    paused = query(dsn, "SELECT paused_at IS NOT NULL FROM relay_destination")
    assert paused == [(True,)]
    # the operator fixes the key; the held messages go out
    cio.add_write_key("fixed-key-1111")
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "UPDATE relay_destination SET write_key = 'fixed-key-1111', paused_at = NULL,"
            " paused_reason = NULL"
        )
        conn.commit()
    run_drain(make_relay(dsn, cio))
    assert states(dsn) == {"delivered": 4}


def test_no_destination_holds_messages_until_one_is_configured(
    dsn: str, cio: FakeCustomerIO
) -> None:
    write_events(dsn, [funnel_event("cus_x", 0, project="prj_x")])
    relay = make_relay(dsn, cio, write_key=None)
    ok, _ = drain(relay, 3.0)
    assert ok
    held = query(dsn, "SELECT DISTINCT state, last_error FROM relay_outbox")
    assert held == [("held", "no destination configured for project prj_x")]
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "INSERT INTO relay_destination (project_id, region, api_url, write_key)"
            " VALUES ('prj_x', 'us', %s, %s)",
            (cio.url, KEY),
        )
        conn.commit()
    run_drain(make_relay(dsn, cio, write_key=None))
    assert states(dsn) == {"delivered": 2}


def test_the_age_limit_makes_a_failing_message_dead(dsn: str, cio: FakeCustomerIO) -> None:
    cio.set_fault_rates({"500": 1.0}, seed=1)
    write_events(dsn, [funnel_event("cus_1", 0)])
    relay = make_relay(dsn, cio, max_age_s=1.0)
    run_drain(relay)
    assert states(dsn) == {"dead": 2}
    errors = query(dsn, "SELECT DISTINCT last_error FROM relay_outbox")
    assert "HTTP 500" in errors[0][0] and "message age" in errors[0][0]
    assert {r[1] for r in attempts(dsn)} == {"retry"}


def test_oversize_message_never_reaches_the_network(dsn: str, cio: FakeCustomerIO) -> None:
    body = {
        "type": "track",
        "userId": "c",
        "event": "x",
        "messageId": "m-big",
        "properties": {"blob": "x" * 40_000},
    }
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "INSERT INTO relay_outbox (message_id, event_id, kind, customer_key, event_type,"
            " body, occurred_at) VALUES ('m-big', 'e', 'track', 'c', 'x', %s, now())",
            (json.dumps(body),),
        )
        conn.commit()
    write_events(dsn, [funnel_event("c2", 0)])
    run_drain(make_relay(dsn, cio))
    dead = query(
        dsn, "SELECT message_id, attempts, last_error FROM relay_outbox WHERE state = 'dead'"
    )
    assert len(dead) == 1 and dead[0][:2] == ("m-big", 0)
    assert dead[0][2].startswith("message is 400") and "32768-byte limit" in dead[0][2]
    assert "m-big" not in cio.accepted_message_ids()
    assert states(dsn) == {"dead": 1, "delivered": 2}


def test_failing_customer_does_not_block_others_and_keeps_its_order(
    dsn: str, cio: FakeCustomerIO
) -> None:
    write_events(dsn, [funnel_event("cus_a", 0)])
    cio.script(["500"])
    relay = make_relay(dsn, cio, backoff_base_s=5.0, backoff_cap_s=5.0)
    relay.deliver_once()  # cus_a's messages now wait ~5 s for a retry
    write_events(dsn, [funnel_event("cus_a", 1), funnel_event("cus_b", 0)])
    relay.deliver_once()
    relay.close()
    got = query(dsn, "SELECT customer_key, state FROM relay_outbox ORDER BY id")
    assert got == [
        ("cus_a", "retrying"),
        ("cus_a", "retrying"),
        ("cus_a", "pending"),  # may not overtake cus_a's earlier messages
        ("cus_a", "pending"),
        ("cus_b", "delivered"),  # another customer flows on
        ("cus_b", "delivered"),
    ]


def test_a_requeued_old_message_gets_a_fresh_age_limit(dsn: str, cio: FakeCustomerIO) -> None:
    write_events(dsn, [funnel_event("cus_old", 0)])
    with psycopg.connect(dsn) as conn:
        # written two days ago, died, and re-queued by an operator just now
        conn.execute(
            "UPDATE relay_outbox SET created_at = now() - interval '2 days',"
            " requeued_at = now(), requeued_by = 'ops'"
        )
        conn.commit()
    cio.script(["500"])
    relay = make_relay(dsn, cio)
    relay.deliver_once()
    relay.close()
    assert states(dsn) == {"retrying": 2}  # not dead: the age limit counts from the re-queue


def test_a_failure_inside_a_long_customer_chain_holds_back_the_rest_of_it(
    dsn: str, cio: FakeCustomerIO
) -> None:
    # 20 tracks of ~25 KB: more than one 475,000-byte batch, so the customer's messages form a
    # chain of batches that must go one after another.
    write_events(dsn, [funnel_event("cus_long", n, blob="x" * 25_000) for n in range(20)])
    cio.script(["500"])
    relay = make_relay(dsn, cio)
    relay.deliver_once()
    relay.close()
    assert len(cio.requests) == 1  # the chain's second batch was not sent past the failure
    assert cio.accepted_items() == []
    assert "in_flight" not in states(dsn)
    run_drain(make_relay(dsn, cio))
    tracks = [i["properties"]["n"] for i in cio.accepted_items() if i["type"] == "track"]
    assert tracks == list(range(20))
    assert len(cio.requests) == 3  # the failed one, then the two batches of the chain in order
    assert states(dsn).keys() <= {"delivered", "coalesced"}


def test_the_relay_vacuums_the_outbox_when_dead_tuples_pile_up(
    dsn: str, cio: FakeCustomerIO
) -> None:
    write_events(dsn, [funnel_event(f"cus_{i}", 0) for i in range(50)])
    relay = make_relay(dsn, cio, vacuum_min_dead=20, vacuum_interval_s=0.01)
    try:
        run_drain(make_relay(dsn, cio))  # claims and marks leave ~200 dead tuples
        from tests.relay_helpers import wait_until

        # statistics reach pg_stat_user_tables within about a second
        assert wait_until(relay.vacuum_if_needed, timeout=15, every=0.2)
        assert wait_until(
            lambda: (
                query(
                    dsn,
                    "SELECT bool_and(last_vacuum IS NOT NULL) FROM pg_stat_user_tables"
                    " WHERE relid IN (SELECT relid FROM pg_partition_tree('relay_outbox')"
                    " WHERE isleaf)",
                )
                == [(True,)]
            ),
            timeout=15,
        )
    finally:
        relay.close()


def test_vacuum_is_skipped_below_the_threshold(dsn: str, cio: FakeCustomerIO) -> None:
    relay = make_relay(dsn, cio, vacuum_min_dead=10**9)
    try:
        assert relay.vacuum_if_needed() is False
    finally:
        relay.close()


# --- concurrent chains ----------------------------------------------------------------------


def _relay_backends(dsn: str, purpose: str = "%") -> set[int]:
    """The relay's sessions (application_name "relay <purpose> test-relay")."""
    rows = query(
        dsn,
        "SELECT pid FROM pg_stat_activity WHERE application_name LIKE %s "
        "AND datname = current_database()",
        (f"relay {purpose} test-relay",),
    )
    return {int(r[0]) for r in rows}


def _send_backends(dsn: str) -> set[int]:
    return _relay_backends(dsn, "send")


def _deliver_in_background(relay: Relay) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            relay.deliver_once()
        except BaseException as exc:  # handed to the test thread
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, errors


def _four_long_customers(dsn: str) -> None:
    # With batch_size 4, a claim takes 4 rows of each of 4 customers, and no two of these
    # customers fit one batch: 4 chains that share no customer, sent 4 at a time.
    write_events(dsn, [funnel_event(f"cust_{c}", n) for n in range(4) for c in range(4)])


def test_chains_are_sent_at_once_each_recording_on_its_own_connection(
    dsn: str, cio: FakeCustomerIO
) -> None:
    _four_long_customers(dsn)
    cio.latency_s = 0.5
    relay = make_relay(dsn, cio, batch_size=4, concurrency=4)
    try:
        thread, errors = _deliver_in_background(relay)
        # While the requests wait on the server, every sending thread has its own session.
        assert wait_until(lambda: len(_send_backends(dsn)) == 4, timeout=5.0)
        thread.join(10)
        assert not errors, errors
        assert len(cio.requests) == 4
        cio.latency_s = 0.0
        run_drain(relay)
        done = states(dsn)
        assert set(done) == {"delivered", "coalesced"} and sum(done.values()) == 32
        received = [item["messageId"] for item in cio.accepted_items()]
        assert len(received) == len(set(received)) == done["delivered"]
    finally:
        relay.close()
    # close() closes the sending threads' connections too.
    assert wait_until(lambda: not _send_backends(dsn), timeout=5.0)


def test_a_sending_thread_that_loses_its_connection_is_an_outage_then_recovers(
    dsn: str, cio: FakeCustomerIO
) -> None:
    _four_long_customers(dsn)
    cio.latency_s = 0.5
    relay = make_relay(dsn, cio, batch_size=4, concurrency=4, lease_s=3.0)
    try:
        thread, errors = _deliver_in_background(relay)
        assert wait_until(lambda: len(_send_backends(dsn)) == 4, timeout=5.0)
        victims = _send_backends(dsn)
        # Cut the sending threads' sessions while their requests are on the wire: the server
        # takes the messages, the threads cannot record it.
        with psycopg.connect(dsn, autocommit=True) as admin:
            for pid in victims:
                admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        thread.join(10)
        assert len(errors) == 1 and isinstance(errors[0], DatabaseUnavailable), errors
        # Nothing was lost: the sent but unrecorded rows are still leased to this relay.
        in_flight = states(dsn)["in_flight"]
        assert in_flight > 0
        sent_before = len(cio.accepted_items())
        assert sent_before == in_flight
        # After the lease they are rescued and sent again, on fresh connections, under the
        # same messageIds (at least once).
        cio.latency_s = 0.0
        assert wait_until(lambda: relay.rescue() > 0, timeout=10.0)
        run_drain(relay)
        done = states(dsn)
        assert set(done) == {"delivered", "coalesced"} and sum(done.values()) == 32
        assert not victims & _send_backends(dsn)
        received = [item["messageId"] for item in cio.accepted_items()]
        assert len(set(received)) == done["delivered"]
        assert len(received) == done["delivered"] + in_flight
    finally:
        relay.close()


def _terminate(dsn: str, pids: set[int]) -> None:
    with psycopg.connect(dsn, autocommit=True) as admin:
        for pid in pids:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    assert wait_until(lambda: not pids & _relay_backends(dsn), timeout=5.0)


def _assert_all_delivered_once(dsn: str, cio: FakeCustomerIO) -> None:
    done = states(dsn)
    assert set(done) == {"delivered", "coalesced"} and sum(done.values()) == 32
    received = [item["messageId"] for item in cio.accepted_items()]
    assert len(received) == len(set(received)) == done["delivered"]


def test_an_idle_sending_connection_the_server_ended_is_replaced_before_sending(
    dsn: str, cio: FakeCustomerIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Check every idle connection, not only those idle for seconds: the test need not wait.
    monkeypatch.setattr(daemon, "SEND_CONN_CHECK_AFTER_S", 0.0)
    _four_long_customers(dsn)
    relay = make_relay(dsn, cio, batch_size=4, concurrency=4)
    try:
        relay.deliver_once()
        senders = _send_backends(dsn)
        assert len(senders) == 4
        # idle_session_timeout, an operator or a failover ends the idle sessions.
        _terminate(dsn, senders)
        relay.deliver_once()  # no DatabaseUnavailable: replaced before the requests
        assert len(_send_backends(dsn)) == 4 and not senders & _send_backends(dsn)
        run_drain(relay)
        _assert_all_delivered_once(dsn, cio)
    finally:
        relay.close()


def test_losing_the_delivery_connection_also_replaces_the_sending_threads_connections(
    dsn: str, cio: FakeCustomerIO
) -> None:
    _four_long_customers(dsn)
    relay = make_relay(dsn, cio, batch_size=4, concurrency=4)
    try:
        relay.deliver_once()
        before = _relay_backends(dsn)
        # A server restart ends every session at once; the next cycle finds out at its claim.
        _terminate(dsn, before)
        with pytest.raises(DatabaseUnavailable):
            relay.deliver_once()
        # The sending threads' sessions, used a moment ago, are not trusted either: without
        # this the next chains would be sent and then fail to record, and be sent again.
        relay.deliver_once()
        run_drain(relay)
        _assert_all_delivered_once(dsn, cio)
        assert not before & _relay_backends(dsn)
    finally:
        relay.close()


# --- a statement the database refuses is not an outage -----------------------------------------


def _insert_track(dsn: str, customer: str, **properties: Any) -> None:
    body = {
        "type": "track",
        "userId": customer,
        "event": "checkout.start",
        "properties": properties,
        "messageId": f"raw-{customer}",
    }
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "INSERT INTO relay_outbox (message_id, event_id, kind, customer_key, event_type,"
            " body, occurred_at) VALUES (%s, %s, 'track', %s, 'checkout.start', %s, now())",
            (f"raw-{customer}", f"raw-{customer}", customer, json.dumps(body)),
        )


# An index this test adds, as an operator's or an extension's might be: a row whose value
# does not fit a btree entry cannot go in flight, and the claim's one marking statement fails
# with PostgreSQL's index-size error (SQLSTATE 54000), a data error, not a lost connection.
_IN_FLIGHT_BLOB_INDEX = (
    "CREATE INDEX test_in_flight_blob ON relay_outbox ((body -> 'properties' ->> 'blob'))"
    " WHERE state = 'in_flight'"
)


def test_a_claim_the_database_refuses_for_one_row_is_logged_as_that_and_delivery_goes_on(
    dsn: str, cio: FakeCustomerIO, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="relay")
    write_events(dsn, [funnel_event("cus_a", n) for n in range(2)])
    write_events(dsn, [funnel_event("cus_b", n) for n in range(2)])
    # Random text does not compress: its index entry stays over the 2,704-byte limit.
    _insert_track(dsn, "cus_big", blob=secrets.token_urlsafe(3000))
    with psycopg.connect(dsn) as admin:
        admin.execute(_IN_FLIGHT_BLOB_INDEX)

    # One customer per claim: those written before cus_big are claimed without it and go out;
    # cus_big's claim fails every cycle, and the loop goes on trying, the database up.
    ok, _ = drain(make_relay(dsn, cio, batch_size=1), 3.0)
    assert not ok
    rows = query(dsn, "SELECT customer_key, state, attempts FROM relay_outbox ORDER BY id")
    assert {(c, s) for c, s, _ in rows if c != "cus_big"} <= {
        ("cus_a", "delivered"),
        ("cus_a", "coalesced"),
        ("cus_b", "delivered"),
        ("cus_b", "coalesced"),
    }, rows
    assert [(s, n) for c, s, n in rows if c == "cus_big"] == [("pending", 0)]
    delivered = query(dsn, "SELECT message_id FROM relay_outbox WHERE state = 'delivered'")
    assert len(delivered) >= 4 and set(cio.accepted_message_ids()) == {m for (m,) in delivered}

    logged = [r for r in caplog.records if r.levelno >= logging.ERROR]
    refused = [r.getMessage() for r in logged if "OUTBOX_CLAIM_MARK" in r.getMessage()]
    assert len(refused) >= 2, [r.getMessage() for r in logged]  # each cycle, tried again
    for message in refused:
        assert message.startswith("deliver: statement OUTBOX_CLAIM_MARK failed: SQLSTATE 54000")
        assert "index row size" in message and "exceeds btree version 4 maximum" in message
        assert "\n" not in message
    assert not [r for r in logged if r.exc_info], "one line each, no traceback"
    assert "connection lost" not in caplog.text


def test_a_refused_claim_keeps_its_session_and_the_next_claim_uses_it(
    dsn: str, cio: FakeCustomerIO
) -> None:
    _insert_track(dsn, "cus_big", blob=secrets.token_urlsafe(3000))
    with psycopg.connect(dsn) as admin:
        admin.execute(_IN_FLIGHT_BLOB_INDEX)
    relay = make_relay(dsn, cio)
    try:
        with pytest.raises(StatementFailed) as refused:
            relay.deliver_once()
        assert refused.value.sqlstate == "54000"
        assert refused.value.statement == "OUTBOX_CLAIM_MARK"
        assert isinstance(refused.value.__cause__, psycopg.errors.ProgramLimitExceeded)
        (session,) = _relay_backends(dsn, "deliver")
        # The operator drops the index: the same session claims again, nothing reconnects.
        with psycopg.connect(dsn) as admin:
            admin.execute("DROP INDEX test_in_flight_blob")
        assert relay.deliver_once().delivered == 1
        assert _relay_backends(dsn, "deliver") == {session}
        assert states(dsn) == {"delivered": 1}
    finally:
        relay.close()


def test_a_statement_timeout_in_maintenance_is_one_line_and_the_session_stays(
    dsn: str, cio: FakeCustomerIO, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="relay")
    relay = make_relay(dsn, cio)
    rescue = service._guard("rescue", relay.rescue)
    try:
        with relay.svc() as conn:
            conn.execute("SET statement_timeout = '200ms'")
            conn.commit()
        (session,) = _relay_backends(dsn, "services")
        # A migration holds the outbox: the rescue's statement waits, then times out.
        with psycopg.connect(dsn) as blocker:
            blocker.execute("LOCK TABLE relay_outbox IN ACCESS EXCLUSIVE MODE")
            rescue()
        (record,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert record.getMessage().startswith(
            "rescue: statement OUTBOX_RESCUE_EXPIRED failed: SQLSTATE 57014 (QueryCanceled):"
            " canceling statement due to statement timeout"
        )
        assert record.exc_info is None
        assert "connection lost" not in caplog.text
        # The lock is gone: the same session serves the next run.
        assert relay.rescue() == 0
        assert _relay_backends(dsn, "services") == {session}
    finally:
        relay.close()
