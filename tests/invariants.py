"""The delivery guarantees, checked against what a fake Customer.io accepted.

One checker for every test that drives the relay (the guarantees tests, the stateful property
test, the chaos run), so they all judge the same promises (README, "What delivery guarantees"):

- **Order.** Per customer, the first acceptances of messages follow write order. A re-send
  (at-least-once: the relay died, or its request timed out after the server stored it) may
  come later; it is counted (``late_resends``) but not a violation: a replay re-sends a
  stretch of the customer's messages in order, so a replayed older identify is followed by the
  newer ones again. What must hold once everything is delivered is ``final_profiles``: every
  customer's traits are those of its identifies applied in write order.
- **Identify before track.** When a track is first accepted, the traits Customer.io holds for
  its customer (every identify accepted before it, applied in acceptance order) include every
  trait written in the customer's identifies before that track, each with the value of that
  identify or of a later one (a merged identify may carry newer values).
- **Duplicates** only under the same messageId with the same body.

The outbox rows are read from the database (``written``), so the checker sees what the
application wrote, not what the relay thinks it sent.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg


@dataclass(frozen=True)
class Written:
    """One outbox row as the application wrote it."""

    row_id: int
    message_id: str
    customer: str
    kind: str
    body: Any


@dataclass
class Verdict:
    order_violations: list[str] = field(default_factory=list)
    track_before_identify: list[str] = field(default_factory=list)
    late_resends: int = 0
    body_mismatches: list[str] = field(default_factory=list)
    duplicates: int = 0
    accepted_twice: set[str] = field(default_factory=set)

    @property
    def ok(self) -> bool:
        return not (self.order_violations or self.track_before_identify or self.body_mismatches)

    def summary(self) -> str:
        parts = [
            f"order violations {len(self.order_violations)}",
            f"track-before-identify {len(self.track_before_identify)}",
            f"duplicate bodies differing {len(self.body_mismatches)}",
            f"duplicates {self.duplicates} ({self.late_resends} after a later message)",
        ]
        examples = (self.order_violations + self.track_before_identify + self.body_mismatches)[:5]
        return "; ".join(parts) + ("".join(f"\n  {e}" for e in examples))


def read_written(
    conn: psycopg.Connection[Any], original: dict[int, Any] | None = None
) -> list[Written]:
    """The outbox in write order. ``original`` maps row ids to bodies as first written (the
    relay rewrites a merged identify's carrier body); rows not in it are read as stored."""
    rows = conn.execute(
        "SELECT id, message_id, customer_key, kind, body FROM relay_outbox ORDER BY id"
    ).fetchall()
    original = original or {}
    return [Written(r[0], r[1], r[2], r[3], original.get(r[0], r[4])) for r in rows]


def _traits(body: Any) -> dict[str, Any]:
    if isinstance(body, dict) and isinstance(body.get("traits"), dict):
        return dict(body["traits"])
    return {}


def check(
    written: Sequence[Written],
    accepted: Iterable[dict[str, Any]],
    *,
    exempt: set[str] | frozenset[str] = frozenset(),
) -> Verdict:
    """Judge ``accepted`` (items in the order the server stored them) against ``written``.

    ``exempt`` lists messageIds whose identify may legitimately never arrive (a poison row the
    relay marked dead): a track after it is not held to that identify's traits.
    """
    verdict = Verdict()
    position = {w.message_id: n for n, w in enumerate(written)}
    by_mid = {w.message_id: w for w in written}
    per_customer: dict[str, list[Written]] = defaultdict(list)
    for w in written:
        per_customer[w.customer].append(w)
    index_in_customer = {
        w.message_id: i for rows in per_customer.values() for i, w in enumerate(rows)
    }

    seen_body: dict[str, str] = {}
    held: dict[str, dict[str, Any]] = defaultdict(dict)  # customer -> traits Customer.io holds
    newest_first: dict[str, int] = {}  # customer -> highest write index first accepted so far
    first_seen: set[str] = set()
    for item in accepted:
        mid = item.get("messageId")
        if not isinstance(mid, str) or mid not in position:
            continue
        w = by_mid[mid]
        text = json.dumps(item, sort_keys=True)
        if mid in seen_body:
            verdict.duplicates += 1
            verdict.accepted_twice.add(mid)
            if seen_body[mid] != text:
                verdict.body_mismatches.append(f"{mid}: accepted twice with different bodies")
        else:
            seen_body[mid] = text
        idx = index_in_customer[mid]
        latest = newest_first.get(w.customer, -1)
        if idx < latest:
            if mid in first_seen:
                verdict.late_resends += 1
            else:
                verdict.order_violations.append(
                    f"{w.customer}: {w.kind} {mid} (write #{idx}) first accepted after "
                    f"write #{latest}"
                )
        if item.get("type") == "identify":
            held[w.customer].update(_traits(item))
        elif mid not in first_seen:
            missing = _missing_traits(per_customer[w.customer], idx, held[w.customer], exempt)
            if missing:
                verdict.track_before_identify.append(
                    f"{w.customer}: track {mid} (write #{idx}) reached a profile without "
                    f"{sorted(missing)}"
                )
        first_seen.add(mid)
        newest_first[w.customer] = max(latest, idx)
    return verdict


def _missing_traits(
    rows: Sequence[Written], idx: int, held: dict[str, Any], exempt: set[str] | frozenset[str]
) -> set[str]:
    """Traits written in identifies before row ``idx`` that Customer.io does not hold with the
    value of that identify or a later one."""
    missing: set[str] = set()
    required: dict[str, int] = {}  # trait -> index of the last identify before idx setting it
    for i, w in enumerate(rows[:idx]):
        if w.kind == "identify" and w.message_id not in exempt:
            for key in _traits(w.body):
                required[key] = i
    for key, since in required.items():
        if key not in held:
            missing.add(key)
            continue
        allowed = [
            _traits(w.body)[key]
            for w in rows[since:]
            if w.kind == "identify" and key in _traits(w.body)
        ]
        if held[key] not in allowed:
            missing.add(key)
    return missing


def final_profiles(
    written: Sequence[Written],
    accepted: Iterable[dict[str, Any]],
    *,
    exempt: set[str] | frozenset[str] = frozenset(),
) -> list[str]:
    """Once everything is delivered: customers whose traits in Customer.io (every accepted
    identify applied in acceptance order) differ from their identifies applied in write order."""
    expected: dict[str, dict[str, Any]] = defaultdict(dict)
    for w in written:
        if w.kind == "identify" and w.message_id not in exempt:
            expected[w.customer].update(_traits(w.body))
    known = {w.message_id: w.customer for w in written}
    held: dict[str, dict[str, Any]] = defaultdict(dict)
    for item in accepted:
        customer = known.get(item.get("messageId", ""))
        if customer is not None and item.get("type") == "identify":
            held[customer].update(_traits(item))
    return [
        f"{customer}: holds {held.get(customer)} instead of {traits}"
        for customer, traits in expected.items()
        if held.get(customer) != traits
    ]
