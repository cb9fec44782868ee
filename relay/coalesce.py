"""Merging one customer's pending identifies into a single identify.

AppFunnel re-identifies a customer on every event, so a busy funnel writes an identify beside
almost every track. Customer.io keeps only the resulting attributes, and it applies an identify
by replacing each top-level trait it names, whole. Sending the identifies one by one therefore
leaves exactly the state of one identify whose traits are all of theirs merged key by key,
newest value last. That merge is done here, and it sends one identify where there were many.

Safety rests on three facts about the caller and this module:

- The caller stores the merged body on the carrier row in the same transaction that marks the
  other identifies coalesced. A retry then re-sends the merged body under the carrier's
  messageId, never a different body under an id Customer.io may already hold.
- Rows already attempted (``attempts > 0``) may be held by Customer.io under their messageId,
  so they are never merged or rewritten, and only the fresh identifies written after the last
  attempted row are merged (a fresh row before an attempted one, which only an operator's
  re-queue produces, is sent as it is).
- **Everything goes out in write order, and the carrier is the FIRST merged identify.** The
  merged identify therefore sits at or before every identify it absorbed, so each track still
  follows an identify that carries every trait written before it, and this stays true however
  often the request fails: a retried claim sends the same rows in the same order. (Carrying
  the merge on the last identify and moving it to the front held only until the first
  failure; the retry then sent the attempted rows in write order, the tracks before it.)

The merged identify takes the newest timestamp of its parts because Customer.io may ignore an
update older than the attribute it already holds. A track may thus reach a profile holding
traits written after it, never one missing a trait written before it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from types import MappingProxyType
from typing import Any, Literal


@dataclass(frozen=True)
class Claimed:
    """One outbox row claimed by a relay, with the exact Customer.io message it carries."""

    row_id: int
    kind: Literal["identify", "track"]
    body: Mapping[str, Any]
    attempts: int


@dataclass(frozen=True)
class Outgoing:
    """One message to send, and the row whose outcome it decides."""

    row_id: int
    body: Mapping[str, Any]


@dataclass(frozen=True)
class Plan:
    """What to send for one customer, in order, and what to record before sending.

    ``send`` holds every row that is not coalesced, exactly once. ``coalesced_into`` maps each
    merged-away identify to the carrier row that now carries its traits. ``rewritten`` holds
    the carrier's new body, present only when merging changed it.
    """

    send: tuple[Outgoing, ...]
    coalesced_into: Mapping[int, int]
    rewritten: Mapping[int, Mapping[str, Any]]


def merge_traits(identifies: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The traits Customer.io holds after receiving these identify bodies in order.

    A shallow merge: a later value replaces an earlier one whole, nested objects included
    (``funnelData`` from the newest identify replaces the older one, it is not merged into it).
    An identify without ``traits`` contributes nothing.
    """
    merged: dict[str, Any] = {}
    for body in identifies:
        traits = body.get("traits")
        if traits is None:
            continue
        if not isinstance(traits, Mapping):
            raise TypeError(f"identify traits must be an object, got {type(traits).__name__}")
        merged.update(traits)
    return merged


def coalesce(rows: Sequence[Claimed]) -> Plan:
    """Plan the sending of one customer's claimed rows, given in write order.

    ``send`` is the rows in write order, minus the coalesced identifies. The fresh identifies
    after the last attempted row, when there are two or more, become one identify carried by
    the first of them (its row id and messageId), with the merged traits and the newest
    timestamp.

    The identifies are sent unmerged when a merge might not equal sending them one by one: if
    they name different ``userId`` values (two profiles, not one), or if a body is not an
    object, a ``traits`` is not an object or a ``timestamp`` is missing, unreadable or without
    a UTC offset (so "newest" is not known). Such rows go out as written and strict mode judges
    them; they are never dropped here.
    """
    seen: set[int] = set()
    for row in rows:
        if row.row_id in seen:
            raise ValueError(f"row {row.row_id} appears twice")
        if row.attempts < 0:
            raise ValueError(f"row {row.row_id} has a negative attempt count: {row.attempts}")
        seen.add(row.row_id)

    last_attempted = max((n for n, row in enumerate(rows) if row.attempts > 0), default=-1)
    identifies = [row for row in rows[last_attempted + 1 :] if row.kind == "identify"]
    coalesced_into: dict[int, int] = {}
    rewritten: dict[int, Mapping[str, Any]] = {}
    stamps = _timestamps(identifies) if len(identifies) > 1 else None
    if stamps is None:
        return _plan([Outgoing(row.row_id, row.body) for row in rows], coalesced_into, rewritten)

    carrier = identifies[0]
    # The newest identify's other keys (its context is the latest known), under the carrier's
    # messageId: the id is the row's, the one every retry of this row must repeat.
    merged = dict(identifies[-1].body)
    if "messageId" in carrier.body:
        merged["messageId"] = carrier.body["messageId"]
    else:
        merged.pop("messageId", None)
    traits = merge_traits([row.body for row in identifies])
    if traits or any("traits" in row.body for row in identifies):
        merged["traits"] = traits
    merged["timestamp"] = _newest(identifies, stamps)
    body: Mapping[str, Any] = carrier.body
    if merged != carrier.body:
        body = merged
        rewritten[carrier.row_id] = merged
    for row in identifies[1:]:
        coalesced_into[row.row_id] = carrier.row_id
    send = [
        Outgoing(row.row_id, body if row is carrier else row.body)
        for row in rows
        if row.row_id not in coalesced_into
    ]
    return _plan(send, coalesced_into, rewritten)


def _plan(
    send: list[Outgoing],
    coalesced_into: dict[int, int],
    rewritten: dict[int, Mapping[str, Any]],
) -> Plan:
    # Read-only views: a plan is shared between the transaction that records it and the request
    # that sends it, and neither may change what the other sees.
    return Plan(
        send=tuple(send),
        coalesced_into=MappingProxyType(coalesced_into),
        rewritten=MappingProxyType(rewritten),
    )


def _timestamps(identifies: Sequence[Claimed]) -> list[datetime] | None:
    """Each identify's timestamp, or ``None`` when merging might differ from sending one by one."""
    if not all(isinstance(row.body, Mapping) for row in identifies):
        return None
    user_id = identifies[0].body.get("userId")
    stamps: list[datetime] = []
    for row in identifies:
        if row.body.get("userId") != user_id:
            return None
        traits = row.body.get("traits")
        if traits is not None and not isinstance(traits, Mapping):
            return None
        at = _parse_timestamp(row.body.get("timestamp"))
        if at is None:
            return None
        stamps.append(at)
    return stamps


def _parse_timestamp(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    # A naive timestamp cannot be ordered against an aware one without guessing its zone.
    if parsed.tzinfo is None or parsed.utcoffset() is None:
        return None
    return parsed


def _newest(identifies: Sequence[Claimed], stamps: Sequence[datetime]) -> str:
    """The original string of the newest timestamp; on a tie, the one written last.

    Compared as instants, not as text: "...+02:00" and "...Z" do not sort as strings, and the
    original string is kept so the body changes no more than the merge requires.
    """
    newest = 0
    for i, at in enumerate(stamps):
        if at >= stamps[newest]:
            newest = i
    timestamp: str = identifies[newest].body["timestamp"]
    return timestamp
