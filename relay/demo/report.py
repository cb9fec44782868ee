"""What the demo shows once the relay is done: Customer.io's view, the audit, the checks.

``Report.collect`` reads the demo's outbox rows and the attempts that carried them, and what
the stand-in stored; everything else here is computed from those, without I/O. Delivery is
at-least-once, so a messageId the stand-in stored twice is counted as a duplicate and shown
once.
"""

from __future__ import annotations

import statistics
import textwrap
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from relay import queries as q
from relay.demo.funnels import EVENT_PREFIX, Person, Written
from relay.tables import text_table

if TYPE_CHECKING:
    from relay.daemon import CycleResult
    from relay.demo.database import Database
    from relay.testing.fakecio import Accepted, FakeCustomerIO

_MAX_DETAIL_ROWS: Final = 60
_MAX_CUSTOMER_ROWS: Final = 20
_WIDTH: Final = 100


@dataclass(frozen=True)
class OutboxRow:
    id: int
    message_id: str
    event_id: str
    kind: str
    customer_key: str
    event_type: str
    state: str
    attempts: int
    coalesced_into: int | None
    last_error: str | None


@dataclass(frozen=True)
class AttemptRow:
    status_code: int | None
    outcome: str
    error: str | None
    message_count: int
    message_ids: list[int]


@dataclass
class Report:
    people: list[Person]
    written: list[Written]
    rows: list[OutboxRow]
    attempts: list[AttemptRow]
    accepted: list[Accepted]
    server_statuses: Counter[int]
    faults: dict[str, int]
    totals: CycleResult

    @classmethod
    def collect(
        cls,
        dsn: str,
        people: list[Person],
        written: list[Written],
        cio: FakeCustomerIO,
        totals: CycleResult,
    ) -> Report:
        from psycopg.rows import class_row

        from relay.db import connect

        with connect(dsn) as conn:
            with conn.cursor(row_factory=class_row(OutboxRow)) as cur:
                rows = cur.execute(q.OUTBOX_DEMO_ROWS, {"prefix": EVENT_PREFIX + "%"}).fetchall()
            with conn.cursor(row_factory=class_row(AttemptRow)) as acur:
                attempts = acur.execute(
                    q.ATTEMPT_DEMO_ROWS, {"ids": [r.id for r in rows]}
                ).fetchall()
        # Called once the stand-in has stopped, so its records are final.
        statuses = Counter(r.status for r in cio.requests)
        accepted, faults = list(cio.accepted), dict(cio.fault_counts)
        return cls(people, written, rows, attempts, accepted, statuses, faults, totals)

    # -- derived facts ---------------------------------------------------------------------

    @property
    def committed(self) -> list[Written]:
        return [w for w in self.written if w.committed]

    @property
    def rolled_back(self) -> list[Written]:
        return [w for w in self.written if not w.committed]

    def expected_messages(self) -> list[Mapping[str, Any]]:
        """Every message the committed events map to, in commit order."""
        return [m.body for w in self.committed for m in w.messages]

    def first_arrivals(self) -> dict[str, Accepted]:
        """Each messageId's first storage at the server.

        Delivery is at-least-once: a later copy of a messageId is the same message again (its
        request timed out yet went through), so it is counted as a duplicate and left out of
        the tables and profiles.
        """
        first: dict[str, Accepted] = {}
        for a in self.accepted:
            first.setdefault(str(a.item.get("messageId")), a)
        return first

    def anonymous_events(self) -> int:
        return sum(1 for w in self.committed for r in w.results if r.skipped == "anonymous")

    def merged_into(self) -> Counter[int]:
        return Counter(r.coalesced_into for r in self.rows if r.coalesced_into is not None)

    def checks(self, drained: bool) -> list[tuple[bool, str]]:
        by_state = Counter(r.state for r in self.rows)
        rows_by_id = {r.id: r for r in self.rows}
        arrived = self.first_arrivals()
        expected_ids = {str(m["messageId"]) for m in self.expected_messages()}
        outbox_ids = {r.message_id for r in self.rows}

        def carrier(row: OutboxRow) -> OutboxRow:
            # A carrier that was sent but refused without counting an attempt (a 401 holds it)
            # is fresh again at its next claim and may be merged into a later identify itself,
            # so the row that finally went out is found by following the chain.
            seen = {row.id}
            while row.state == "coalesced" and row.coalesced_into in rows_by_id:
                row = rows_by_id[row.coalesced_into]
                if row.id in seen:
                    break
                seen.add(row.id)
            return row

        missing = [
            r
            for r in self.rows
            if not (carrier(r).state == "delivered" and carrier(r).message_id in arrived)
        ]
        results = [
            (
                drained and not missing and outbox_ids == expected_ids,
                f"every committed message reached Customer.io: {by_state['delivered']} "
                f"delivered, {by_state['coalesced']} merged into a later identify"
                + (f"; NOT DELIVERED: {len(missing)}" if missing else "")
                + ("" if drained else "; the drain timed out")
                + ("" if outbox_ids == expected_ids else "; the outbox differs from the events"),
            )
        ]

        for w in self.rolled_back:
            doomed = {m.message_id for m in w.messages}
            leaked = doomed & (outbox_ids | set(arrived))
            results.append(
                (
                    not leaked,
                    f"nothing of {w.tx.person}'s rolled-back {w.tx.label} ({w.tx.fails}) reached "
                    f"the outbox or Customer.io ({len(doomed)} messages)"
                    + (f"; LEAKED: {len(leaked)}" if leaked else ""),
                )
            )

        # Anonymous events map to no message, so anything of theirs at the server is a stray.
        strays = [a for a in self.accepted if str(a.item.get("messageId")) not in expected_ids]
        results.append(
            (
                not strays,
                f"nothing anonymous or unexpected was sent ({self.anonymous_events()} anonymous "
                "page views skipped)" + (f"; UNEXPECTED: {len(strays)}" if strays else ""),
            )
        )

        profiles = self.profiles()
        wanted = self.expected_profiles()
        matching = sum(1 for key, traits in wanted.items() if profiles.get(key) == traits)
        results.append(
            (
                matching == len(wanted),
                f"every customer's profile at Customer.io equals the application's "
                f"({matching} of {len(wanted)})",
            )
        )
        return results

    def profiles(self) -> dict[str, dict[str, Any]]:
        """Each customer's traits at Customer.io: its identifies applied in storage order."""
        from relay.coalesce import merge_traits

        bodies: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for a in sorted(self.first_arrivals().values(), key=lambda a: a.seq):
            if a.item.get("type") == "identify":
                bodies[str(a.item.get("userId"))].append(a.item)
        return {key: merge_traits(items) for key, items in bodies.items()}

    def expected_profiles(self) -> dict[str, dict[str, Any]]:
        """Each customer's traits had every identify been sent one by one, in commit order."""
        from relay.coalesce import merge_traits

        bodies: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
        for body in self.expected_messages():
            if body["type"] == "identify":
                bodies[str(body["userId"])].append(body)
        return {key: merge_traits(items) for key, items in bodies.items()}

    def commit_latencies_ms(self) -> list[float]:
        """Per committed transaction with messages: commit to its last track's first storage."""
        arrived = self.first_arrivals()
        out: list[float] = []
        for w in self.committed:
            tracks = [m.message_id for m in w.messages if m.kind == "track"]
            if tracks and all(t in arrived for t in tracks):
                last = max(arrived[t].received_at for t in tracks)
                out.append(max(0.0, (last - w.committed_at) * 1000.0))
        return out

    # -- rendering -------------------------------------------------------------------------

    def render(self, *, cio_url: str) -> list[str]:
        lines: list[str] = []
        lines += self._render_received(cio_url)
        lines.append("")
        lines += self._render_requests()
        lines.append("")
        lines += self._render_outbox()
        return lines

    def _render_received(self, cio_url: str) -> list[str]:
        arrived = self.first_arrivals()
        copies = Counter(str(a.item.get("messageId")) for a in self.accepted)
        profiles = self.profiles()
        per_customer: dict[str, list[Accepted]] = defaultdict(list)
        for a in sorted(arrived.values(), key=lambda a: a.seq):
            per_customer[str(a.item.get("userId"))].append(a)

        customers = [p for p in self.people if p.email is not None]
        table = []
        for p in customers[:_MAX_CUSTOMER_ROWS]:
            items = per_customer.get(p.id, [])
            traits = profiles.get(p.id, {})
            table.append(
                (
                    p.id,
                    p.email or "",
                    sum(1 for a in items if a.item["type"] == "identify"),
                    sum(1 for a in items if a.item["type"] == "track"),
                    _show(traits.get("marketing_consent")),
                    _show(traits.get("active_subscription_count")),
                )
            )
        lines = [
            f"What Customer.io received (the local stand-in at {cio_url}, strict mode)",
            "",
            *_table(
                (
                    "customer",
                    "email",
                    "identify",
                    "track",
                    "marketing_consent",
                    "active_subscription_count",
                ),
                table,
            ),
        ]
        if len(customers) > _MAX_CUSTOMER_ROWS:
            lines.append(f"  ... and {len(customers) - _MAX_CUSTOMER_ROWS} more customers")
        visitors = [p for p in self.people if p.email is None]
        views = sum(
            len(w.events) for w in self.committed if w.tx.person in {v.id for v in visitors}
        )
        lines.append(
            f"  {len(visitors)} anonymous visitors ({views} page views): nothing sent, they have "
            "no email"
        )
        duplicates = sum(n - 1 for n in copies.values())
        lines.append(
            wrap(
                f"  {sum(self.server_statuses.values())} HTTP requests "
                f"({self.server_statuses[200]} answered 200), {len(self.accepted)} messages "
                f"stored, {duplicates} duplicates (a messageId stored again: a request that "
                "timed out had gone through)",
                indent="  ",
            )
        )

        first = customers[0]
        merged = self.merged_into()
        row_of = {r.message_id: r for r in self.rows}
        detail = []
        for n, a in enumerate(per_customer.get(first.id, []), 1):
            item = a.item
            row = row_of.get(str(item.get("messageId")))
            if item["type"] == "identify":
                carried = merged.get(row.id, 0) if row else 0
                event = f"(merges {carried + 1} identifies)" if carried else ""
                details = _traits_text(item.get("traits", {}))
            else:
                event = str(item.get("event", ""))
                details = _props_text(item.get("properties", {}))
            detail.append((n, a.request_no, item["type"], event, details))
        lines += [
            "",
            f"Messages for {first.id} ({first.name}), in the order Customer.io stored them",
            "",
            *_table(("#", "request", "type", "event", "traits / properties"), detail),
        ]
        return lines

    def _render_requests(self) -> list[str]:
        groups: dict[tuple[str, str], list[AttemptRow]] = defaultdict(list)
        for a in self.attempts:
            groups[(_answer(a), a.outcome)].append(a)
        table = [
            (answer, outcome, len(rows), sum(r.message_count for r in rows))
            for (answer, outcome), rows in sorted(groups.items())
        ]
        faults = ", ".join(f"{kind} x{n}" for kind, n in sorted(self.faults.items())) or "none"
        return [
            "HTTP requests to Customer.io (relay_attempt, the relay's audit of every request)",
            "",
            *_table(("answer", "outcome", "requests", "messages"), table),
            f"  faults the stand-in injected: {faults}",
        ]

    def _render_outbox(self) -> list[str]:
        by_state = Counter(r.state for r in self.rows)
        states = [(s, n) for s, n in sorted(by_state.items(), key=lambda kv: -kv[1])]
        first = next(p for p in self.people if p.email is not None)
        shown = [
            r
            for r in self.rows
            if r.customer_key == first.id
            or r.attempts > 1
            or r.state not in ("delivered", "coalesced")
        ]
        hidden = len(shown) - _MAX_DETAIL_ROWS
        shown = shown[:_MAX_DETAIL_ROWS]
        # The answers Customer.io gave each request that carried the row: why it took N tries.
        answers: dict[int, list[str]] = defaultdict(list)
        for a in self.attempts:
            for row_id in a.message_ids:
                answers[row_id].append(_answer(a))
        # last_error is cleared on delivery; it only says something for a row that failed.
        failed = any(r.state not in ("delivered", "coalesced") for r in shown)
        headers = ["id", "customer", "event", "kind", "state", "attempts", "coalesced_into"]
        headers += ["answers", *(["last_error"] if failed else [])]
        table = [
            (
                r.id,
                r.customer_key,
                r.event_type,
                r.kind,
                r.state,
                r.attempts,
                r.coalesced_into,
                " ".join(answers.get(r.id, [])),
                *([(r.last_error or "")[:60]] if failed else []),
            )
            for r in shown
        ]
        lines = [
            "Delivery status in the outbox (relay_outbox)",
            "",
            *_table(("state", "messages"), states),
            "",
            f"Messages of {first.id}, and every message that needed more than one attempt",
            "",
            *_table(headers, table),
        ]
        if hidden > 0:
            lines.append(f"  ... {hidden} more rows")
        return lines

    def summary_line(self, elapsed_s: float, db_ready_s: float, poll_interval_s: float) -> str:
        committed_events = sum(len(w.events) for w in self.committed)
        anonymous = self.anonymous_events()
        rolled_back = sum(len(w.events) for w in self.rolled_back)
        identified = committed_events - anonymous
        requests = len(self.attempts)
        per_1000 = requests * 1000.0 / identified if identified else 0.0
        latencies = self.commit_latencies_ms()
        latency = (
            f"commit to Customer.io: median {statistics.median(latencies):.0f} ms "
            f"(poll interval {poll_interval_s * 1000:.0f} ms); "
            if latencies
            else ""
        )
        return wrap(
            f"Summary: {committed_events} events written ({anonymous} anonymous, skipped), "
            f"{rolled_back} rolled back with their order; {len(self.rows)} outbox messages "
            f"({self.totals.coalesced} identifies merged into others); {requests} requests "
            f"({per_1000:.0f} per 1,000 identified events); {latency}"
            f"{elapsed_s:.1f} s in all ({db_ready_s:.1f} s to get the database ready)",
            indent="  ",
        )


def next_steps(db: Database) -> list[str]:
    """Commands to try next, each working as printed where the demo ran.

    On the embedded server, which stops when the demo exits, that is the daemon on the same
    data folder (``relay run --embedded``, a database of its own beside the demo's); reading
    the demo's outbox with ``relay status`` needs a DATABASE_URL, so it is offered only after
    a demo on one.
    """
    lines = ["Try next"]
    if db.embedded:
        import shlex

        data_dir = shlex.quote(str(Path(db.server.data_dir).absolute()))
        lines += [
            f"  CUSTOMERIO_WRITE_KEY=... relay run --embedded --data-dir {data_dir}",
            "      the daemon on this embedded PostgreSQL (in a database of its own, relay),",
            "      delivering to your own Customer.io workspace",
            "  DATABASE_URL=postgresql://... relay demo",
            "      the same demo on your own PostgreSQL, where relay status and the views",
            "      relay_status and relay_message_history then show its outbox",
        ]
        return lines
    lines += [
        "  relay status                                the outbox's backlog (reads DATABASE_URL)",
        "  SELECT * FROM relay_status;                 every count exact, as a SQL view",
        "  SELECT * FROM relay_message_history;        every message with its attempts",
        "  CUSTOMERIO_WRITE_KEY=... relay run          deliver to your own Customer.io workspace",
    ]
    return lines


# --- formatting -------------------------------------------------------------------------------


def _table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    """Rows as aligned plain text under a header and a rule; numeric columns right-aligned."""
    return text_table(headers, rows, indent="  ", rule=True, empty="(none)")


def wrap(text: str, *, indent: str) -> str:
    """``text`` filled to the report's width, its continuation lines indented by ``indent``."""
    return textwrap.fill(text, width=_WIDTH, subsequent_indent=indent, break_on_hyphens=False)


def _show(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _traits_text(traits: Mapping[str, Any]) -> str:
    shown = ("email", "marketing_consent", "active_subscription_count")
    return " ".join(f"{k}={_show(traits[k])}" for k in shown if k in traits)


def _props_text(props: Mapping[str, Any]) -> str:
    parts = []
    if "amount" in props:
        parts.append(f"{props['amount']:.2f} {props.get('currency', '')}".rstrip())
    for key in (
        "plan",
        "interval",
        "order_id",
        "payment_method",
        "card_brand",
        "signup_method",
        "channel",
        "period",
        "path",
    ):
        if key in props:
            parts.append(f"{key}={props[key]}")
    return " ".join(parts)


def _answer(attempt: AttemptRow) -> str:
    if attempt.status_code is not None:
        return str(attempt.status_code)
    # A transport failure has no status; its recorded error starts with the kind (timeout...).
    return (attempt.error or "error").split(":", 1)[0]
