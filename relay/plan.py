"""From the rows one claim locked to what to send and what to mark: pure, no I/O.

The claim (``relay.claim``) fetches, for each customer it took, the customer's unfinished rows
from its first due row on, in write order. ``plan_claim`` decides, per customer:

1. **The run**: the leading rows that can go now, to one destination. It stops at the first
   row that is held, in flight or not yet due (a later retry): nothing may overtake it.
2. **Routing**: a run whose destination is missing, disabled or paused is held, with the reason.
3. **Poison**: a row whose body Customer.io could never accept (not a JSON object, a ``type``
   that is not its kind, no ``userId``, ``traits`` not an object, an unreadable ``timestamp``,
   over the size limit) is dead at once with a reason naming the field; so is a body the relay
   cannot read, which jsonb stores and Python's json module refuses (nested deeper than its
   recursion limit, an integer longer than its int conversion limit), with a reason naming
   that. It affects only its own message: the rest of the run goes on, and coalescing never
   sees it. The claim query checks the shape on jsonb first (``shape_ok``); a track that
   passes is sent as stored, unparsed, and only the rest is parsed and judged here. Sizes are
   judged as Customer.io measures them (``relay.limits``): a stored body from its jsonb text,
   counted without a parse, so the fast path stays unparsed. A run whose ``project_id`` is
   longer than ``MAX_PROJECT_ID_BYTES`` (only SQL can write one; ``record_event`` refuses it)
   is dead before routing: held, it would need an index entry PostgreSQL refuses, and the
   claim that tried would fail as a whole.
4. **Coalescing** (``relay.coalesce``): the fresh identifies merge into one, sent in write order.
   A merge that cannot be written back as JSON (nested too deep for the encoder, a number
   Python read as infinity) is not made: the identifies go out as stored, as for a merge over
   the size limit.

Nothing here raises on row content: a body that breaks an assumption is dead, never an
exception that would stop the relay for every customer.
"""

from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, Literal, cast

from relay.coalesce import Claimed, Outgoing, Plan, coalesce
from relay.destinations import Route
from relay.limits import (
    MAX_MESSAGE_BYTES,
    MAX_PROJECT_ID_BYTES,
    message_size,
    text_size,
    utf8_size,
)
from relay.models.states import DUE_STATES


@dataclass(frozen=True)
class ClaimedRow:
    """A row of OUTBOX_CLAIM_FOLLOWERS, in its column order."""

    id: int
    customer_key: str
    kind: str
    project_id: str | None
    event: str
    body_text: str
    attempts: int
    state: str
    due: bool
    age_s: float
    # The database's structural check of the body passed (OUTBOX_CLAIM_FOLLOWERS): a track
    # that passes is sent as stored without being parsed here.
    shape_ok: bool = False
    # The partition key: the claim's span of these (Lease.span) keeps its updates to the days
    # the rows are in.
    occurred_at: datetime | None = None


@dataclass(frozen=True)
class Item:
    """One message of a claim, ready to send."""

    row_id: int
    customer_key: str
    event: str
    kind: str
    encoded: bytes
    attempts: int
    age_s: float
    size: int = -1
    """The message's size as Customer.io measures it (``relay.limits``), which batching packs
    by; never less than ``len(encoded)``. The planner passes the size it judged; left at -1 it
    is measured from ``encoded`` on construction."""

    def __post_init__(self) -> None:
        if self.size < 0:
            object.__setattr__(self, "size", message_size(json.loads(self.encoded)))


@dataclass
class DestinationWork:
    """What one claim gives one destination: items in send order (customers in write order)."""

    route: Route
    items: list[Item] = field(default_factory=list)


@dataclass
class ClaimPlan:
    """Everything the claim transaction marks, and what is sent after it commits.

    Every claimed row of a customer's run is in exactly one of ``in_flight`` (sent under the
    claim's lease), ``coalesced``, ``held`` or ``dead``; rows after the run are left untouched.
    ``rewritten`` holds merged identifies' bodies, stored on their carrier before sending.
    """

    work: dict[str, DestinationWork] = field(default_factory=dict)
    in_flight: list[int] = field(default_factory=list)
    coalesced: dict[int, int] = field(default_factory=dict)
    rewritten: dict[int, bytes] = field(default_factory=dict)
    held: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    dead: dict[int, str] = field(default_factory=dict)
    claimed: int = 0
    coalesced_by_destination: dict[str, int] = field(default_factory=lambda: defaultdict(int))


def encode(body: Any) -> bytes:
    """Compact UTF-8 JSON, as a re-encoded body is stored and sent (never longer than what
    Customer.io counts, ``relay.limits.message_size``).

    Raises ``ValueError`` for a float JSON cannot write (infinity: jsonb holds numbers past a
    float's range, which Python reads as inf) rather than write ``Infinity``, which neither
    jsonb nor Customer.io takes; ``RecursionError`` for nesting past the encoder's reach."""
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


# The structural characters of a JSON text and its strings (skipped whole, escapes included).
_JSON_NESTING: Final = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')
_INT_DIGITS: Final = re.compile(r"value has (\d+) digits")


def nesting_depth(text: str) -> int:
    """How deep the arrays and objects of the JSON ``text`` nest (brackets in strings aside)."""
    depth = deepest = 0
    for token in _JSON_NESTING.findall(text):
        if token in ("[", "{"):
            depth += 1
            deepest = max(deepest, depth)
        elif token in ("]", "}"):
            depth -= 1
    return deepest


def parse_body(text: str) -> tuple[Any, str | None]:
    """A stored body's JSON value, or ``(None, why the relay cannot read it)``; never raises.

    jsonb takes what Python's json module refuses: nesting past the interpreter's recursion
    limit (``RecursionError``) and integers longer than its int conversion limit (4,300
    digits by default, ``ValueError``). Raised here, either would fail every claim that takes
    the row."""
    try:
        return json.loads(text), None
    except RecursionError:
        return None, (
            f"body is nested {nesting_depth(text)} levels deep, deeper than the relay's JSON "
            f"parser reads (Python's recursion limit, {sys.getrecursionlimit()})"
        )
    except json.JSONDecodeError as exc:
        return None, f"body is not valid JSON: {exc}"
    except ValueError as exc:
        digits = _INT_DIGITS.search(str(exc))
        if digits is None:
            return None, f"body cannot be read: {str(exc)[:200]}"
        return None, (
            f"body holds a number of {digits.group(1)} digits, longer than the "
            f"{sys.get_int_max_str_digits()} digits the relay's JSON parser reads"
        )


def due_run(rows: Sequence[ClaimedRow]) -> list[ClaimedRow]:
    """The customer's leading rows that can go now, all to the same project."""
    run: list[ClaimedRow] = []
    for row in rows:
        if row.state not in DUE_STATES or not row.due:
            break
        if run and row.project_id != run[0].project_id:
            break
        run.append(row)
    return run


_JSON_NAMES = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}


def _json_name(value: Any) -> str:
    return _JSON_NAMES.get(type(value), "number")


def _shown(value: Any) -> str:
    """``value`` for a reason, at most about 40 characters: a string or a scalar as written, an
    array or an object by its kind only. Never walks a container, which may be nested past
    what repr() can recurse into."""
    if isinstance(value, str):
        return repr(value[:40])
    if isinstance(value, list | dict):
        return f"a JSON {_json_name(value)}"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**40:
        return "a number of over 40 digits"
    return repr(value)


def body_problem(kind: str, body: Any) -> str | None:
    """Why Customer.io could never accept this body as a ``kind`` message, or None.

    Only what is certain without asking Customer.io: strict mode judges everything else, and a
    400 is isolated by bisection. The reason names the field.
    """
    if not isinstance(body, dict):
        return f"body is a JSON {_json_name(body)}, not an object"
    if body.get("type") != kind:
        shown = _shown(body.get("type"))
        return f"body field 'type' is {shown}, expected {kind!r} (the row's kind)"
    user_id, anonymous_id = body.get("userId"), body.get("anonymousId")
    if not (isinstance(user_id, str) and user_id) and not (
        isinstance(anonymous_id, str) and anonymous_id
    ):
        return "body field 'userId' is missing or not a non-empty string"
    if kind == "identify" and "traits" in body and not isinstance(body["traits"], dict):
        return f"body field 'traits' is a JSON {_json_name(body['traits'])}, not an object"
    if kind == "track":
        event = body.get("event")
        if not (isinstance(event, str) and event):
            return "body field 'event' is missing or not a non-empty string"
        if "properties" in body and not isinstance(body["properties"], dict):
            return (
                f"body field 'properties' is a JSON {_json_name(body['properties'])}, not an object"
            )
    if "timestamp" in body and not _iso8601(body["timestamp"]):
        return f"body field 'timestamp' is not an ISO-8601 time: {_shown(body['timestamp'])}"
    if "messageId" in body and not isinstance(body["messageId"], str):
        return "body field 'messageId' is not a string"
    return None


def _iso8601(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        datetime.fromisoformat(value.replace("Z", "+00:00") if value.endswith("Z") else value)
    except ValueError:
        return False
    return True


def _oversize(size: int) -> str:
    return (
        f"message is {size} bytes as Customer.io measures it (JSON with non-ASCII characters "
        f"as \\u escapes), over its {MAX_MESSAGE_BYTES}-byte limit"
    )


def project_problem(project_id: str | None) -> str | None:
    """Why no row of this project can be planned, or None: an id over the limit
    ``record_event`` enforces, which only SQL can have written. Held, such a row would need an
    entry in relay_outbox_held_idx over a btree's limit, failing the whole claim."""
    if project_id is None:
        return None
    size = utf8_size(project_id)
    if size <= MAX_PROJECT_ID_BYTES:
        return None
    return (
        f"project_id is {size} bytes, over the {MAX_PROJECT_ID_BYTES}-byte limit "
        "(relay.limits.MAX_PROJECT_ID_BYTES) that record_event enforces; held, the row could "
        "not be indexed"
    )


def _size(row: ClaimedRow, rewritten: Mapping[int, int]) -> int:
    """The row's message size: its rewritten body's, else its stored text's, counted from
    jsonb's text (json.dumps' separators), never parsed or re-encoded."""
    return rewritten[row.id] if row.id in rewritten else text_size(row.body_text)


@dataclass(frozen=True)
class _Merged:
    """A customer's coalescing, written back: each rewritten body encoded and measured."""

    plan: Plan
    encoded: dict[int, bytes]
    sizes: dict[int, int]


def _merge(claimed: Sequence[Claimed]) -> _Merged | None:
    """Coalesce ``claimed`` and encode what the merge rewrote; None when a rewritten body
    cannot be written back as JSON, and the identifies are then sent as stored.

    Each part parsed, but the merge is compared and encoded deeper in the stack than the parts
    were parsed: a body nested near the recursion limit can fail here alone. A number jsonb
    holds beyond a float's range reads as inf, which JSON cannot write."""
    try:
        merged = coalesce(claimed)
    except RecursionError:
        return None
    try:
        encoded = {i: encode(b) for i, b in merged.rewritten.items()}
        # A merged body is sent now as encoded here, and stored for a retry, which sends
        # jsonb's spelling of it: message_size counts the longer of the two.
        sizes = {i: message_size(b) for i, b in merged.rewritten.items()}
    except (RecursionError, ValueError):
        return None
    return _Merged(merged, encoded, sizes)


def plan_claim(
    heads: Sequence[str],
    rows: Sequence[ClaimedRow],
    route: Callable[[str | None], Route],
) -> ClaimPlan:
    """Plan one claim: ``heads`` are the claimed customers in claim order, ``rows`` every row
    the followers query locked (any order)."""
    plan = ClaimPlan()
    by_customer: dict[str, list[ClaimedRow]] = defaultdict(list)
    for row in rows:
        by_customer[row.customer_key].append(row)
    for customer in heads:
        run = due_run(sorted(by_customer.get(customer, ()), key=lambda r: r.id))
        if not run:
            continue
        plan.claimed += len(run)
        unroutable = project_problem(run[0].project_id)
        if unroutable is not None:
            plan.dead.update((r.id, unroutable) for r in run)
            continue
        where = route(run[0].project_id)
        if where.destination is None:
            plan.held[where.reason or "no destination"].extend(r.id for r in run)
            continue
        _plan_run(plan, customer, run, where)
    return plan


def _plan_run(plan: ClaimPlan, customer: str, run: list[ClaimedRow], where: Route) -> None:
    by_id = {r.id: r for r in run}
    claimed: list[Claimed] = []
    for r in run:
        if r.kind == "track" and r.shape_ok:
            # Checked by the database; sent as stored, never parsed and re-encoded here.
            claimed.append(Claimed(r.id, "track", {}, r.attempts))
            continue
        # The parse is what lets a poison body die alone instead of failing the cycle: it, and
        # every judgement after it, turns what is wrong with the row into its reason.
        body, problem = parse_body(r.body_text)
        if problem is None:
            problem = body_problem(r.kind, body)
        if problem is not None:
            plan.dead[r.id] = f"invalid message body: {problem}"
            continue
        claimed.append(Claimed(r.id, cast(Literal["identify", "track"], r.kind), body, r.attempts))
    merged = _merge(claimed)
    if merged is not None and any(
        _size(by_id[c], merged.sizes) > MAX_MESSAGE_BYTES
        for c in set(merged.plan.coalesced_into.values())
    ):
        # A carrier over the limit would be dead, and the identifies merged into it with it,
        # while each part on its own might have gone through: the parts go instead (each
        # judged on its own size below), as they do when the merge cannot be written at all.
        merged = None
    send: Sequence[Outgoing] = [Outgoing(c.row_id, c.body) for c in claimed]
    coalesced: Mapping[int, int] = {}
    rewritten: Mapping[int, bytes] = {}
    sizes: Mapping[int, int] = {}
    if merged is not None:
        send, coalesced = merged.plan.send, merged.plan.coalesced_into
        rewritten, sizes = merged.encoded, merged.sizes
    unit = plan.work.setdefault(where.pause_key, DestinationWork(where))
    for out in send:
        row = by_id[out.row_id]
        size = _size(row, sizes)
        if size > MAX_MESSAGE_BYTES:
            plan.dead[row.id] = _oversize(size)
            continue
        if row.id in rewritten:
            encoded = rewritten[row.id]
        else:
            try:
                encoded = row.body_text.encode()
            except UnicodeEncodeError:
                # Text PostgreSQL returned holds no lone surrogate; a body that did could not
                # be sent, and must not fail the claim.
                plan.dead[row.id] = "invalid message body: body is not valid UTF-8 text"
                continue
        plan.in_flight.append(row.id)
        unit.items.append(
            Item(row.id, customer, row.event, row.kind, encoded, row.attempts, row.age_s, size)
        )
    plan.coalesced.update(coalesced)
    plan.rewritten.update(rewritten)
    if coalesced:
        plan.coalesced_by_destination[where.pause_key] += len(coalesced)
