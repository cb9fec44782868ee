"""The relay's drain rate over a realistic backlog, next to what the database alone allows.

``python -m bench.drain [--quick] [--customers N] [--dsn URL|embedded]``

1. **Backlog.** ``--customers`` customers (10,000; 1,000 with ``--quick``), each with the
   10-event funnel of ``bench.common.FUNNEL_STEPS``, written by ``record_events`` in durable
   transactions of ``--customers-per-txn`` customers (events interleaved across those
   customers, as concurrent funnels write them): 20 outbox rows per customer (identify + track
   per event). The write time is reported. The backlog is then copied aside, and every
   variant below starts from an identical copy (vacuumed and checkpointed, so none inherits
   the previous one's dead rows or dirty buffers).
2. **Relay variants**, each against its own ``python -m relay.testing.fakecio`` process (so the fake
   server does not share the relay's GIL), each relay in its own process
   (``bench.drain_worker``, which imports first and starts on a signal so start-up is not
   timed):

   - ``api``: one relay, ``Relay(settings, dsn)`` + ``relay.service.drain``, with the server
     answering at once and with ``--latency-ms`` (50) per request;
   - ``cli xN``: N relays (``--relays``, 1 2 4), each ``relay run --drain --instance ...``,
     with ``--scale-latency-ms`` per request (0 and 50).

3. **SQL ceiling**: the relay's database work with no Python and no HTTP, as one PL/pgSQL
   ``DO`` block in one session with ``synchronous_commit = off``: the same claim statements
   (``OUTBOX_CLAIM_HEADS``, ``OUTBOX_CLAIM_FOLLOWERS``), every due row fetched taken, the
   same coalescing (merged carrier body rewritten, other identifies marked coalesced), the
   same in-flight mark, then per 100 sent messages one ``ATTEMPT_INSERT`` and one
   ``OUTBOX_RECORD_OUTCOMES`` in its own transaction; every statement is the relay's own text
   from ``relay.queries`` with PL/pgSQL variables for its parameters. The glue between them
   (which rows a cycle takes, how identifies merge) mirrors the relay's planner and must follow
   it when the claim's logic changes (``relay.plan.plan_claim``).

Rate = rows finished (delivered + coalesced) / seconds from the relays' start to the last
row's finish (``updated_at`` of the last delivered row; the relays' own exit can lag by up to
a poll interval while they wait for each other). Peak RSS is each relay process's own
high-water mark (VmHWM), CPU its own ``getrusage``. Every run checks the drain's correctness
too: nothing dead or left over, and the fake server accepted exactly the delivered rows.
``--repeat N`` runs the whole list N times, each time in a rotated order, and reports each
variant's median run (the JSON keeps every run).

Relay settings come from the environment, for both kinds of variant (``relay run`` reads it,
and so does ``bench.drain_worker`` for ``api``): ``RELAY_CLAIMS_IN_FLIGHT=1 python -m
bench.drain ...`` measures one claim at a time. The settings used are shown with the results,
and with more than one relay count, one relay's rate as a share of each larger count's (per
round, and of the medians).

``--profile`` (default on) drains once more with one relay under py-spy (sampling, all
threads, idle time included) when it is installed, else under cProfile, and lists the top
functions by cumulative time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx
import psycopg

from bench.common import (
    FUNNEL_STEPS,
    REPO_ROOT,
    RESULTS_DIR,
    WRITE_KEY,
    add_database_option,
    bench_database,
    checkpoint,
    code_changed_warning,
    code_fingerprint,
    describe_environment,
    environment,
    footer,
    funnel_event,
    reproduce_command,
    spawn_listening,
    table,
    write_results,
)
from relay import queries as q
from relay import record_events
from relay.settings import from_env

# The relay settings a reader needs to place the figures, as the relays read them.
SHOWN_SETTINGS = {"RELAY_CLAIMS_IN_FLIGHT": "claims_in_flight", "RELAY_CONCURRENCY": "concurrency"}

BATCH_SIZE = 100  # the relay's default RELAY_BATCH_SIZE, which the ceiling mirrors


@dataclass
class Variant:
    key: str
    mode: str  # "api", "cli" or "sql"
    relays: int
    latency_ms: float

    @property
    def label(self) -> str:
        if self.mode == "sql":
            return "SQL ceiling (PL/pgSQL DO block)"
        what = "Relay + drain" if self.mode == "api" else f"relay run --drain x{self.relays}"
        return f"{what}, {self.latency_ms:g} ms"


@dataclass
class Outcome:
    """What one variant did, from the relays, the fake server and the database."""

    variant: Variant
    rows: int
    finished: int
    delivered: int
    coalesced: int
    dead: int
    left: int
    seconds: float
    exit_seconds: float
    requests: int
    attempts: int
    accepted: int
    peak_rss_kb: list[int] = field(default_factory=list)
    relay_cpu_s: float = 0.0
    server_cpu_s: float = 0.0
    postgres_cpu_s: float | None = None
    lock_waits: LockWaits | None = None
    machine_busy: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.finished / self.seconds if self.seconds > 0 else 0.0


# --------------------------------------------------------------------------- backlog


def build_backlog(dsn: str, customers: int, per_txn: int) -> dict[str, Any]:
    """Write the funnel of every customer with ``record_events``; returns the write figures."""
    write_s = 0.0
    events = 0
    with psycopg.connect(dsn) as conn:
        # Durable, as the application writes them.
        conn.execute("SET synchronous_commit = on")
        conn.commit()
        for first in range(0, customers, per_txn):
            group = range(first, min(first + per_txn, customers))
            batch = [funnel_event(n, step) for step in range(len(FUNNEL_STEPS)) for n in group]
            t0 = time.perf_counter()
            record_events(conn, batch)
            conn.commit()
            write_s += time.perf_counter() - t0
            events += len(batch)
        rows = conn.execute("SELECT count(*) FROM relay_outbox").fetchone()
        # The pristine backlog each variant starts from. UNLOGGED: it is only a source to copy.
        conn.execute("CREATE UNLOGGED TABLE bench_backlog AS SELECT * FROM relay_outbox")
        conn.commit()
    n_rows = int(rows[0]) if rows else 0
    return {
        "customers": customers,
        "customers_per_txn": per_txn,
        "events": events,
        "rows": n_rows,
        "write_s": write_s,
        "events_per_s": events / write_s if write_s else 0.0,
        "rows_per_s": n_rows / write_s if write_s else 0.0,
    }


def load_backlog(dsn: str) -> int:
    """Reset the outbox to the pristine backlog; returns its row count."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("TRUNCATE relay_outbox, relay_attempt")
        conn.execute("INSERT INTO relay_outbox SELECT * FROM bench_backlog")
        # Fresh statistics and visibility map, as a table that autovacuum has caught up with.
        conn.execute("VACUUM (ANALYZE) relay_outbox")
        conn.execute("VACUUM (ANALYZE) relay_attempt")
        row = conn.execute("SELECT count(*) FROM relay_outbox").fetchone()
    checkpoint(dsn)
    return int(row[0]) if row else 0


# --------------------------------------------------------------------------- processes


def _wait_rusage(proc: subprocess.Popen[str], timeout_s: float) -> float:
    """Wait for ``proc`` to end and return the CPU seconds it used (user + system).

    ``os.wait4`` rather than ``Popen.wait``: only the reaping call hands back the child's
    resource usage. A process still there after ``timeout_s`` is killed, then reaped.
    """
    deadline = time.monotonic() + timeout_s
    killed = False
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return usage.ru_utime + usage.ru_stime
        if not killed and time.monotonic() > deadline:
            proc.kill()
            killed = True
        time.sleep(0.02)


class FakeServer:
    """``python -m relay.testing.fakecio`` in its own process, for one variant."""

    def __init__(self, latency_ms: float) -> None:
        self.proc, self.url = spawn_listening(
            [
                "-m",
                "relay.testing.fakecio",
                "--port",
                "0",
                "--write-key",
                WRITE_KEY,
                "--latency-ms",
                str(latency_ms),
            ],
            "relay.testing.fakecio",
        )
        self.cpu_s = 0.0

    def stats(self) -> dict[str, Any]:
        return dict(httpx.get(self.url + "/_fake/stats", timeout=30).json())

    def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            self.cpu_s = _wait_rusage(self.proc, 30)


def _py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def run_relays(
    mode: str,
    count: int,
    dsn: str,
    url: str,
    timeout_s: float,
    tag: str,
    profile: str | None = None,
) -> list[dict[str, Any]]:
    """Start ``count`` relay processes, start them draining together, collect their reports."""
    logs = RESULTS_DIR / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen[str]] = []
    log_files: list[IO[str]] = []
    try:
        for k in range(count):
            cmd = [
                sys.executable,
                "-m",
                "bench.drain_worker",
                "--mode",
                mode,
                "--dsn",
                dsn,
                "--url",
                url,
                "--write-key",
                WRITE_KEY,
                "--instance",
                f"bench-{tag}-{k + 1}",
                "--timeout",
                str(timeout_s),
            ]
            if profile == "cprofile":
                cmd += ["--cprofile", str(RESULTS_DIR / "drain-profile.prof")]
            elif profile == "py-spy":
                spy = _py_spy()
                assert spy is not None
                cmd = [
                    spy,
                    "record",
                    "--format",
                    "raw",
                    "--rate",
                    "200",
                    "--threads",
                    "--idle",
                    "--output",
                    str(RESULTS_DIR / "drain-profile.txt"),
                    "--",
                    *cmd,
                ]
            log = open(logs / f"drain-{tag}-{k + 1}.log", "w")  # noqa: SIM115 (closed below)
            log_files.append(log)
            procs.append(
                subprocess.Popen(
                    cmd,
                    cwd=REPO_ROOT,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=log,
                    text=True,
                )
            )
        for p in procs:
            if _protocol_line(p) != "ready":
                raise RuntimeError(f"a relay process did not start; see {logs}")
        for p in procs:  # as close together as the parent can manage
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        reports = []
        for p in procs:
            line = _protocol_line(p)
            if not line.startswith("{"):
                raise RuntimeError(f"a relay process ended without a report; see {logs}")
            reports.append(json.loads(line))
        for p in procs:
            p.wait(timeout=60)
        return reports
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in log_files:
            f.close()


def _protocol_line(proc: subprocess.Popen[str]) -> str:
    """The worker's next line of its own protocol, skipping what py-spy prints on stdout."""
    assert proc.stdout is not None
    for line in proc.stdout:
        if not line.startswith("py-spy>") and line.strip():
            return line.strip()
    return ""


def machine_cpu() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine since boot, from /proc/stat."""
    with open("/proc/stat") as stat:
        fields = [int(x) for x in stat.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user
    return total - idle, total


def postgres_cpu_s() -> float | None:
    """CPU seconds used so far by every local ``postgres`` process, exited backends included.

    A backend's own time is in its /proc/PID/stat (utime, stime); once it exits and the
    postmaster reaps it, its time moves to the postmaster's cutime and cstime, which are read
    too. None when no postgres process is visible (a server on another host or in another
    container): the figure then cannot be measured from here.
    """
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    seen = False
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                raw = f.read()
        except OSError:  # exited while listing
            continue
        comm_end = raw.rfind(")")
        if raw[raw.find("(") + 1 : comm_end] != "postgres":
            continue
        fields = raw[comm_end + 2 :].split()
        # fields[11:15] are utime, stime, cutime, cstime (stat fields 14-17).
        total += sum(int(x) for x in fields[11:15])
        seen = True
    return total / tick if seen else None


# --------------------------------------------------------------------------- the ceiling


def _plpgsql(statement: str) -> str:
    """A relay statement with its %(name)s parameters as PL/pgSQL variables p_name."""
    return re.sub(r"%\((\w+)\)s", r"p_\1", statement.strip())


def ceiling_block(batch: int, lease_s: float) -> str:
    """The relay's claim-and-record database work, as one PL/pgSQL DO block."""
    heads = _plpgsql(q.OUTBOX_CLAIM_HEADS)
    followers = _plpgsql(q.OUTBOX_CLAIM_FOLLOWERS)
    return f"""
DO $ceiling$
DECLARE
    p_customers int := {batch};
    p_per_customer int := {batch};
    p_owner text := 'sql-ceiling';
    p_token bigint := 1;
    p_lease_s float8 := {lease_s};
    p_head_ids bigint[];
    p_customer_keys text[];
    p_ids bigint[];
    p_into_ids bigint[];
    p_bodies jsonb;
    p_relay_instance text := 'sql-ceiling';
    p_destination text := 'default';
    p_started_at timestamptz;
    p_latency_ms float8 := 0;
    p_status_code int := 200;
    p_outcome text := 'delivered';
    p_error text;
    p_response_snippet text := '{{}}';
    p_request_bytes int := 0;
    p_message_count int;
    p_message_ids bigint[];
    p_states text[];
    p_attempted int[];
    p_delays float8[];
    p_errors text[];
    p_occ_lo timestamptz;
    p_floor text := '-infinity';
    p_occ_hi timestamptz;
    v_send bigint[];
    v_coalesced bigint[];
    v_into bigint[];
    v_rw_ids bigint[];
    v_rw_bodies text[];
    v_n int;
BEGIN
    LOOP
        -- Claim: the relay's own statements.
        -- The floor comes back with the heads, for the next claim, as the relay keeps it.
        SELECT coalesce(array_agg(h.id), '{{}}'), coalesce(array_agg(h.customer_key), '{{}}'),
               coalesce(max(h.floor), p_floor)
          INTO p_head_ids, p_customer_keys, p_floor
          FROM ({heads}) AS h;
        IF cardinality(p_head_ids) = 0 THEN
            COMMIT;
            EXIT;
        END IF;
        INSERT INTO ceiling_claim (id, customer_key, kind, body, attempts, state, due, pos,
                                   occurred_at)
        SELECT f.id, f.customer_key, f.kind, f.body, f.attempts, f.state, f.due, k.pos,
               f.occurred_at
          FROM ({followers}) AS f
          JOIN unnest(p_customer_keys) WITH ORDINALITY AS k(customer_key, pos)
            ON k.customer_key = f.customer_key;
        -- Every fetched row that is due is taken, as the relay takes them. (In this backlog
        -- every claimed row is due, so this equals the relay's per-customer due prefix.)
        DELETE FROM ceiling_claim c WHERE NOT (c.state IN ('pending', 'retrying') AND c.due);
        -- The span of the claimed rows' occurred_at, which the relay passes with every
        -- statement by id (relay.lease.Lease.span) so that only their days are probed.
        SELECT min(occurred_at), max(occurred_at) INTO p_occ_lo, p_occ_hi FROM ceiling_claim;
        -- Coalescing: each customer's fresh identifies merge into its first one (the carrier),
        -- which is rewritten with the merged traits when there was more than one.
        SELECT coalesce(array_agg(i.id ORDER BY i.id), '{{}}'),
               coalesce(array_agg(c.carrier ORDER BY i.id), '{{}}')
          INTO v_coalesced, v_into
          FROM ceiling_claim i
          JOIN (SELECT customer_key, min(id) AS carrier FROM ceiling_claim
                 WHERE kind = 'identify' AND attempts = 0 GROUP BY customer_key) c
            USING (customer_key)
         WHERE i.kind = 'identify' AND i.attempts = 0 AND i.id <> c.carrier;
        SELECT coalesce(array_agg(m.carrier), '{{}}'),
               coalesce(array_agg(jsonb_set(cb.body::jsonb, '{{traits}}', m.traits)::text), '{{}}')
          INTO v_rw_ids, v_rw_bodies
          FROM (SELECT c.customer_key, min(c.id) AS carrier, count(DISTINCT c.id) AS parts,
                       jsonb_object_agg(t.key, t.value ORDER BY c.id) AS traits
                  FROM ceiling_claim c
                  CROSS JOIN LATERAL jsonb_each(c.body::jsonb -> 'traits') AS t
                 WHERE c.kind = 'identify' AND c.attempts = 0
                 GROUP BY c.customer_key) m
          JOIN ceiling_claim cb ON cb.id = m.carrier
         WHERE m.parts > 1;
        DELETE FROM ceiling_claim WHERE id = ANY(v_coalesced);
        SELECT coalesce(array_agg(id ORDER BY pos, id), '{{}}')
          INTO v_send FROM ceiling_claim;
        -- One marking statement, as the relay does: rows to send in flight (carriers with
        -- their merged body), merged-away identifies coalesced.
        SELECT array_agg(x.id ORDER BY x.n), array_agg(x.state ORDER BY x.n),
               array_agg(x.into_id ORDER BY x.n), jsonb_agg(x.body::jsonb ORDER BY x.n)
          INTO p_ids, p_states, p_into_ids, p_bodies
          FROM (SELECT s.id, 'in_flight'::text AS state, NULL::bigint AS into_id, rw.body,
                       s.n
                  FROM unnest(v_send) WITH ORDINALITY AS s(id, n)
                  LEFT JOIN unnest(v_rw_ids, v_rw_bodies) AS rw(id, body) USING (id)
                UNION ALL
                SELECT c.id, 'coalesced', c.into_id, NULL, 1000000000 + c.n
                  FROM unnest(v_coalesced, v_into) WITH ORDINALITY AS c(id, into_id, n)) x;
        p_errors := array_fill(NULL::text, ARRAY[cardinality(p_ids)]);
        {_plpgsql(q.OUTBOX_CLAIM_MARK)};
        COMMIT;
        -- Record: one attempt row and one outcome statement per request of <= {batch} items.
        FOR i IN 0 .. (cardinality(v_send) - 1) / {batch} LOOP
            p_ids := v_send[i * {batch} + 1 : (i + 1) * {batch}];
            v_n := cardinality(p_ids);
            p_message_ids := p_ids;
            p_message_count := v_n;
            p_started_at := clock_timestamp();
            p_states := array_fill('delivered'::text, ARRAY[v_n]);
            p_attempted := array_fill(1, ARRAY[v_n]);
            p_delays := array_fill(0::float8, ARRAY[v_n]);
            p_errors := array_fill(NULL::text, ARRAY[v_n]);
            {_plpgsql(q.ATTEMPT_INSERT)};
            {_plpgsql(q.OUTBOX_RECORD_OUTCOMES)};
            COMMIT;
        END LOOP;
    END LOOP;
END
$ceiling$
"""


def run_ceiling(dsn: str) -> tuple[float, float]:
    """Run the ceiling's DO block; returns its (start, end) wall-clock times."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        # As the relay's bookkeeping commits: without waiting for the WAL flush.
        conn.execute(q.SESSION_ASYNC_COMMIT)
        conn.execute(
            # body as text: the relay fetches it as text (or as jsonb, which a text column
            # takes too) and parses only the identifies it merges.
            "CREATE TEMP TABLE ceiling_claim (id bigint, customer_key text, kind text, "
            "body text, attempts int, state text, due bool, pos bigint, "
            "occurred_at timestamptz) "
            "ON COMMIT DELETE ROWS"
        )
        block = ceiling_block(BATCH_SIZE, 30.0)
        start = time.time()
        conn.execute(block.encode())
        end = time.time()
    return start, end


# --------------------------------------------------------------------------- one variant


def _database_outcome(dsn: str) -> tuple[Counter[str], float | None, int]:
    with psycopg.connect(dsn) as conn:
        states: Counter[str] = Counter(
            {
                s: int(n)
                for s, n in conn.execute(
                    "SELECT state, count(*) FROM relay_outbox GROUP BY state"
                ).fetchall()
            }
        )
        last = conn.execute(
            "SELECT extract(epoch FROM max(updated_at))::float8 FROM relay_outbox "
            "WHERE state IN ('delivered', 'coalesced')"
        ).fetchone()
        attempts = conn.execute("SELECT count(*) FROM relay_attempt").fetchone()
    return states, (last[0] if last else None), int(attempts[0]) if attempts else 0


@dataclass
class LockWaits:
    """What ``LockWaitSampler`` saw: how often the relays' sessions waited on a lock."""

    samples: int
    mean_waiting: float  # sessions waiting on a heavyweight lock, averaged over the samples
    share_with_wait: float  # of the samples, those where at least one session waited
    mean_active: float  # sessions running a statement, averaged
    # What the waiting sessions waited for (wait_event: transactionid, tuple, relation, ...) and
    # the statement they ran (its first words), counted over the samples: the place to look.
    waited_for: dict[str, int] = field(default_factory=dict)


class LockWaitSampler(threading.Thread):
    """Samples ``pg_stat_activity`` every ``every_s`` during a run, on its own session.

    PostgreSQL keeps no running total of lock waits, so they are sampled: at each sample, the
    sessions of this database (the sampler's own left out) that run a statement, and those of
    them that wait for a heavyweight lock (``wait_event_type = 'Lock'``: a row lock another
    claim holds, a tuple lock, a relation lock). SKIP LOCKED claims never wait for row locks,
    so waits here mean contention elsewhere: outcome writes against a claim's lock, the
    throttle row, the vacuum. The sampler's own cost is one catalog read per sample.
    """

    SQL = r"""
    SELECT a.wait_event_type = 'Lock', a.state = 'active',
           a.wait_event || ': ' || left(regexp_replace(a.query, '\s+', ' ', 'g'), 50)
           || ' <- ' || coalesce((
               SELECT string_agg(b.state || ' ' || left(regexp_replace(b.query, '\s+', ' ', 'g'),
                                                         50), ' | ')
               FROM pg_stat_activity b WHERE b.pid = ANY(pg_blocking_pids(a.pid))), '?')
    FROM pg_stat_activity a
    WHERE a.datname = current_database() AND a.backend_type = 'client backend'
      AND a.pid <> pg_backend_pid()
    """

    def __init__(self, dsn: str, every_s: float = 0.02) -> None:
        super().__init__(name="bench-lock-sampler", daemon=True)
        self._dsn = dsn
        self._every = every_s
        self._halt = threading.Event()
        self._seen: list[tuple[int, int]] = []
        self._waited_for: Counter[str] = Counter()

    def run(self) -> None:
        with psycopg.connect(self._dsn, autocommit=True) as conn:
            while not self._halt.wait(self._every):
                rows = conn.execute(self.SQL).fetchall()
                waiting = [what for locked, _, what in rows if locked]
                self._waited_for.update(waiting)
                self._seen.append((len(waiting), sum(1 for _, active, _ in rows if active)))

    def finish(self) -> LockWaits:
        self._halt.set()
        self.join(timeout=5.0)
        n = len(self._seen)
        if not n:
            return LockWaits(0, 0.0, 0.0, 0.0)
        return LockWaits(
            samples=n,
            mean_waiting=sum(w for w, _ in self._seen) / n,
            share_with_wait=sum(1 for w, _ in self._seen if w) / n,
            mean_active=sum(a for _, a in self._seen) / n,
            waited_for=dict(self._waited_for.most_common(5)),
        )


def run_variant(v: Variant, dsn: str, rows: int, timeout_s: float) -> Outcome:
    busy0, total0 = machine_cpu()
    pg0 = postgres_cpu_s()
    sampler = LockWaitSampler(dsn)
    server: FakeServer | None = None
    reports: list[dict[str, Any]] = []
    stats: dict[str, Any] = {}
    problems: list[str] = []
    sampler.start()
    try:
        if v.mode == "sql":
            start, exit_at = run_ceiling(dsn)
        else:
            server = FakeServer(v.latency_ms)
            reports = run_relays(v.mode, v.relays, dsn, server.url, timeout_s, v.key)
            stats = server.stats()
            start = min(r["start"] for r in reports)
            exit_at = max(r["end"] for r in reports)
    finally:
        lock_waits = sampler.finish()
        if server is not None:
            server.stop()
    busy1, total1 = machine_cpu()
    pg1 = postgres_cpu_s()
    states, last_finish, attempts = _database_outcome(dsn)
    delivered, coalesced = states["delivered"], states["coalesced"]
    finished = delivered + coalesced
    # The last row's finish, by the database clock (the same machine's clock when the server is
    # local); fall back on the relays' exit if the two clocks visibly disagree.
    if last_finish is not None and start < last_finish <= exit_at + 1.0:
        end = last_finish
    else:
        end = exit_at
    left = sum(n for s, n in states.items() if s not in ("delivered", "coalesced", "dead"))
    if states["dead"]:
        problems.append(f"{states['dead']} rows dead")
    if left:
        problems.append(f"{left} rows not finished: {dict(states)}")
    if finished + states["dead"] != rows:
        problems.append(f"{finished} finished + {states['dead']} dead != {rows} rows")
    for r in reports:
        if not r["totals"].get("ok"):
            problems.append(f"relay {r['instance']} did not complete: {r['totals']}")
    accepted = int(stats.get("accepted", 0))
    if v.mode != "sql" and accepted != delivered:
        problems.append(f"fake server accepted {accepted} items for {delivered} delivered rows")
    return Outcome(
        variant=v,
        rows=rows,
        finished=finished,
        delivered=delivered,
        coalesced=coalesced,
        dead=states["dead"],
        left=left,
        seconds=end - start,
        exit_seconds=exit_at - start,
        requests=int(stats.get("requests", attempts)),
        attempts=attempts,
        accepted=accepted,
        peak_rss_kb=[int(r["peak_rss_kb"]) for r in reports],
        relay_cpu_s=sum(r["cpu_user_s"] + r["cpu_system_s"] for r in reports),
        server_cpu_s=server.cpu_s if server else 0.0,
        postgres_cpu_s=pg1 - pg0 if pg0 is not None and pg1 is not None else None,
        lock_waits=lock_waits,
        machine_busy=(busy1 - busy0) / (total1 - total0) if total1 > total0 else 0.0,
        problems=problems,
    )


# --------------------------------------------------------------------------- profile


def profile_drain(dsn: str, timeout_s: float, top: int) -> dict[str, Any]:
    """Drain once more with one relay under a profiler; the top functions by cumulative time."""
    tool = "py-spy" if _py_spy() else "cprofile"
    server = FakeServer(0)
    try:
        reports = run_relays("api", 1, dsn, server.url, timeout_s, "profile", profile=tool)
    finally:
        server.stop()
    seconds = reports[0]["end"] - reports[0]["start"]
    innermost: list[dict[str, Any]] = []
    if tool == "py-spy":
        rows, innermost, samples = _py_spy_top(RESULTS_DIR / "drain-profile.txt", top)
        source = str(RESULTS_DIR / "drain-profile.txt")
    else:
        rows, samples = _cprofile_top(RESULTS_DIR / "drain-profile.prof", top)
        source = str(RESULTS_DIR / "drain-profile.prof")
    return {
        "tool": tool,
        "seconds": seconds,
        "samples": samples,
        "top": rows,
        "innermost_relay_lines": innermost,
        "raw": source,
    }


def _frame_key(frame: str) -> str:
    # "function (path/to/file.py:123)" -> "function (file.py)": one entry per function.
    found = re.match(r"(.*) \((.*?)(?::\d+)?\)$", frame)
    if not found:
        return frame
    name, path = found.groups()
    # py-spy already prints package-relative paths; cProfile's are absolute.
    for marker in ("site-packages/", str(REPO_ROOT) + "/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{name} ({path})"


def _py_spy_top(path: Path, top: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
    """From py-spy's raw output, the drain's samples on the main thread: the top functions by
    inclusive samples, and the top lines of relay/ code that were innermost (where the relay's
    own code was when the sample was taken, whatever library it had called)."""
    lines = path.read_text().splitlines()
    main_tids = {
        m.group(1) for line in lines if (m := re.match(r"thread \((\d+)\): MainThread;", line))
    }
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    relay_lines: Counter[str] = Counter()
    total = 0
    for line in lines:
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        frames = stack.split(";")
        thread = re.match(r"thread \((\d+)\)", frames[0])
        if thread:
            if thread.group(1) not in main_tids:
                continue
            frames = frames[1:]
        # Only the drain itself: not start-up, not the wait for the start signal.
        if not any(f.startswith(("_drain_api (", "_drain_cli (")) for f in frames):
            continue
        count = int(count_text)
        total += count
        keys = [_frame_key(f) for f in frames]
        for key in set(keys):
            inclusive[key] += count
        own[keys[-1]] += count
        ours = [f for f in frames if re.search(r"\(relay/[^)]*\)$", f)]
        if ours:
            relay_lines[ours[-1]] += count
    functions = [
        {
            "function": key,
            "cumulative_pct": 100.0 * n / total,
            "self_pct": 100.0 * own[key] / total,
        }
        for key, n in inclusive.most_common()
        # Frames on every sample (the entry points down to the drain loop) say nothing.
        if n < total
    ][:top]
    innermost = [{"line": key, "pct": 100.0 * n / total} for key, n in relay_lines.most_common(top)]
    return functions, innermost, total


def _cprofile_top(path: Path, top: int) -> tuple[list[dict[str, Any]], int]:
    import pstats

    stats = pstats.Stats(str(path))
    entries = stats.stats  # type: ignore[attr-defined]
    total = max((ct for (_cc, _nc, _tt, ct, _callers) in entries.values()), default=0.0)
    ranked = sorted(entries.items(), key=lambda kv: kv[1][3], reverse=True)
    rows = []
    for (filename, line, name), (_cc, calls, tt, ct, _callers) in ranked:
        if ct >= total:
            continue
        rows.append(
            {
                "function": _frame_key(f"{name} ({filename}:{line})"),
                "calls": calls,
                "cumulative_s": ct,
                "self_s": tt,
                "cumulative_pct": 100.0 * ct / total if total else 0.0,
                "self_pct": 100.0 * tt / total if total else 0.0,
            }
        )
        if len(rows) == top:
            break
    return rows, int(total * 1000)


# --------------------------------------------------------------------------- main


def _variants(args: argparse.Namespace) -> list[Variant]:
    out = [
        Variant("api-0", "api", 1, 0.0),
        Variant(f"api-{args.latency_ms:g}", "api", 1, args.latency_ms),
    ]
    for latency in args.scale_latency_ms:
        for n in args.relays:
            out.append(Variant(f"cli{n}-{latency:g}", "cli", n, latency))
    out.append(Variant("sql", "sql", 0, 0.0))
    return out


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.drain",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="1,000 customers (about a minute)")
    parser.add_argument("--customers", type=int, help="customers in the backlog (10,000)")
    parser.add_argument("--customers-per-txn", type=int, default=100)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument(
        "--relays", type=_ints, default=[1, 2, 4], help="relay counts for the scale figure"
    )
    parser.add_argument(
        "--scale-latency-ms",
        type=_floats,
        help="server latencies for the scale figure (default 0,50; 50 with --quick)",
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="run every variant N times; report the median"
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="per drain, seconds")
    parser.add_argument("--no-profile", dest="profile", action="store_false")
    add_database_option(parser)
    args = parser.parse_args(argv)
    customers = args.customers or (1_000 if args.quick else 10_000)
    if args.scale_latency_ms is None:
        args.scale_latency_ms = [50.0] if args.quick else [0.0, 50.0]
    command = reproduce_command("bench.drain")
    variants = _variants(args)

    runs: dict[str, list[Outcome]] = {v.key: [] for v in variants}
    profile: dict[str, Any] | None = None
    with bench_database(args.dsn) as db:
        env = environment(db)
        print(f"writing the backlog: {customers:,} customers x 10 events", file=sys.stderr)
        backlog = build_backlog(db.dsn, customers, args.customers_per_txn)
        for r in range(max(1, args.repeat)):
            # Rotated each round, so a slow spell on the machine does not always hit the same
            # variant at the same point of the run.
            shift = r % len(variants)
            for v in variants[shift:] + variants[:shift]:
                rows = load_backlog(db.dsn)
                print(f"  {v.label} ...", file=sys.stderr, end="", flush=True)
                o = run_variant(v, db.dsn, rows, args.timeout)
                runs[v.key].append(o)
                print(
                    f" {o.finished:,} rows in {o.seconds:.1f} s = {o.rate:,.0f}/s"
                    + (f"  PROBLEMS: {'; '.join(o.problems)}" if o.problems else ""),
                    file=sys.stderr,
                    flush=True,
                )
        if args.profile:
            load_backlog(db.dsn)
            print("  profiling one relay ...", file=sys.stderr, flush=True)
            profile = profile_drain(db.dsn, args.timeout, 10)

    payload = _payload(command, env, backlog, runs, profile, args)
    payload["relay_code_changed"] = code_changed_warning(env, code_fingerprint())
    path = write_results("drain", payload)
    print(render(payload))
    print(f"\nresults: {path}")
    return 1 if any(o.problems for done in runs.values() for o in done) else 0


def _median_run(done: list[Outcome]) -> Outcome:
    """The run whose rate is the median (the lower middle one for an even count)."""
    ordered = sorted(done, key=lambda o: o.rate)
    return ordered[(len(ordered) - 1) // 2]


def _payload(
    command: str,
    env: dict[str, Any],
    backlog: dict[str, Any],
    runs: dict[str, list[Outcome]],
    profile: dict[str, Any] | None,
    args: argparse.Namespace,
) -> dict[str, Any]:
    outcomes = [_median_run(done) for done in runs.values()]
    ceiling = next((o.rate for o in outcomes if o.variant.mode == "sql"), 0.0)
    single = next((o.rate for o in outcomes if o.variant.key == "api-0"), 0.0)
    events = backlog["events"]
    rows = []
    for o in outcomes:
        v = o.variant
        rows.append(
            {
                "key": v.key,
                "label": v.label,
                "mode": v.mode,
                "relays": v.relays,
                "latency_ms": v.latency_ms,
                "rows": o.rows,
                "finished": o.finished,
                "delivered": o.delivered,
                "coalesced": o.coalesced,
                "dead": o.dead,
                "left": o.left,
                "seconds": o.seconds,
                "exit_seconds": o.exit_seconds,
                "messages_per_s": o.rate,
                "runs": len(runs[v.key]),
                "messages_per_s_all_runs": [x.rate for x in runs[v.key]],
                "vs_single_relay_0ms": o.rate / single if single else None,
                "fraction_of_sql_ceiling": o.rate / ceiling if ceiling else None,
                "requests": o.requests if v.mode != "sql" else o.attempts,
                "requests_per_1000_events": (
                    (o.requests if v.mode != "sql" else o.attempts) / (events / 1000)
                ),
                "attempt_rows": o.attempts,
                "accepted_by_server": o.accepted if v.mode != "sql" else None,
                "peak_rss_mb_per_relay": max(o.peak_rss_kb) / 1024 if o.peak_rss_kb else None,
                "relay_cpu_s": o.relay_cpu_s if v.mode != "sql" else None,
                "relay_cpu_ms_per_1000_rows": (
                    1000 * o.relay_cpu_s / (o.finished / 1000)
                    if v.mode != "sql" and o.finished
                    else None
                ),
                "server_cpu_s": o.server_cpu_s if v.mode != "sql" else None,
                "postgres_cpu_ms_per_1000_rows": (
                    1000 * o.postgres_cpu_s / (o.finished / 1000)
                    if o.postgres_cpu_s is not None and o.finished
                    else None
                ),
                "lock_waits": asdict(o.lock_waits) if o.lock_waits else None,
                "machine_cpu_busy_pct": 100 * o.machine_busy,
                "problems": [p for x in runs[v.key] for p in x.problems],
            }
        )
    return {
        "benchmark": "drain",
        "command": command,
        "environment": env,
        "parameters": {
            "customers": backlog["customers"],
            "customers_per_txn": backlog["customers_per_txn"],
            "latency_ms": args.latency_ms,
            "relays": args.relays,
            "scale_latency_ms": args.scale_latency_ms,
            "batch_size": BATCH_SIZE,
            "repeat": args.repeat,
            "quick": args.quick,
            "relay_settings": relay_settings(),
        },
        "backlog": backlog,
        "variants": rows,
        "ceiling_implementation": "PL/pgSQL DO block, one session, synchronous_commit = off",
        "profile": profile,
    }


def relay_settings() -> dict[str, Any]:
    """``SHOWN_SETTINGS`` as every relay of this run reads them (the default when unset)."""
    settings = from_env({k: v for k, v in os.environ.items() if k in SHOWN_SETTINGS})
    return {var: getattr(settings, name) for var, name in SHOWN_SETTINGS.items()}


def scale_ratios(variants: Sequence[dict[str, Any]]) -> list[str]:
    """One relay's rate as a share of N relays' at the same latency: of the medians, and of
    each round's pair (runs of one round share the machine's conditions most closely)."""
    cli = {(r["latency_ms"], r["relays"]): r for r in variants if r["mode"] == "cli"}
    out = []
    for (latency, n), many in sorted(cli.items()):
        one = cli.get((latency, 1))
        if n == 1 or one is None or not many["messages_per_s"]:
            continue
        rounds = [
            f"{100 * a / b:.0f}%"
            for a, b in zip(
                one["messages_per_s_all_runs"], many["messages_per_s_all_runs"], strict=False
            )
            if b
        ]
        out.append(
            f"one relay / {n} relays, {latency:g} ms: "
            f"{one['messages_per_s']:,.0f} / {many['messages_per_s']:,.0f} = "
            f"{100 * one['messages_per_s'] / many['messages_per_s']:.0f}% of the medians"
            + (f"; per round {', '.join(rounds)}" if len(rounds) > 1 else "")
        )
    return out


def _lock_cell(w: dict[str, Any] | None) -> str | None:
    """Mean sessions running a statement / waiting on a lock (and how often any waited)."""
    if not w or not w["samples"]:
        return None
    return (
        f"{w['mean_active']:.2f} / {w['mean_waiting']:.2f} "
        f"({100 * w['share_with_wait']:.0f}% of samples)"
    )


def render(payload: dict[str, Any]) -> str:
    b = payload["backlog"]
    out = [
        "drain: the relay's delivery rate over a realistic backlog",
        describe_environment(payload["environment"]),
        "",
        f"Backlog: {b['customers']:,} customers x 10 events = {b['events']:,} events, "
        f"{b['rows']:,} outbox rows, written by record_events ({b['customers_per_txn']} "
        f"customers per durable transaction) in {b['write_s']:.1f} s = "
        f"{b['events_per_s']:,.0f} events/s ({b['rows_per_s']:,.0f} rows/s).",
        "",
    ]
    headers = [
        "variant",
        "rows finished",
        "seconds",
        "messages/s",
        "x single 0 ms",
        "of SQL ceiling",
        "requests",
        "req/1k events",
        "coalesced",
        "peak RSS MB/relay",
        "relay CPU ms/1k rows",
        "PostgreSQL CPU ms/1k rows",
        "sessions active / on a lock",
        "fake server CPU s",
        "machine CPU busy",
    ]
    repeated = any(r["runs"] > 1 for r in payload["variants"])
    if repeated:
        headers.insert(4, "range over runs")
    rows = []
    for r in payload["variants"]:
        sql = r["mode"] == "sql"
        spread = (
            f"{min(r['messages_per_s_all_runs']):,.0f}-{max(r['messages_per_s_all_runs']):,.0f}"
        )
        rows.append(
            [
                r["label"],
                r["finished"],
                r["seconds"],
                r["messages_per_s"],
                None if sql else r["vs_single_relay_0ms"],
                f"{100 * r['fraction_of_sql_ceiling']:.0f}%"
                if r["fraction_of_sql_ceiling"]
                else None,
                r["requests"],
                r["requests_per_1000_events"],
                r["coalesced"],
                r["peak_rss_mb_per_relay"],
                r["relay_cpu_ms_per_1000_rows"],
                r.get("postgres_cpu_ms_per_1000_rows"),
                _lock_cell(r.get("lock_waits")),
                r["server_cpu_s"],
                f"{r['machine_cpu_busy_pct']:.0f}%",
            ]
        )
        if repeated:
            rows[-1].insert(4, spread)
    out.append(table(headers, rows))
    shown = payload["parameters"].get("relay_settings") or {}
    out.append("")
    out.append("Relay settings: " + ", ".join(f"{k}={v}" for k, v in shown.items()))
    out.extend(scale_ratios(payload["variants"]))
    for r in payload["variants"]:
        waited = (r.get("lock_waits") or {}).get("waited_for") or {}
        if waited:
            out.append(
                f"lock waits in {r['label']}: "
                + "; ".join(f"{n} x {what}" for what, n in waited.items())
            )
    problems = [(r["label"], p) for r in payload["variants"] for p in r["problems"]]
    out.append("")
    if problems:
        out.extend(f"PROBLEM in {label}: {p}" for label, p in problems)
    else:
        out.append(
            "Every variant finished every row: nothing dead or left over, and the fake "
            "server accepted exactly the delivered rows (no message sent twice)."
        )
    out.append(
        "messages/s = rows finished (delivered + coalesced) per second, from the relays' "
        "start to the last row's finish"
        + (", median of the runs" if repeated else "")
        + ". The SQL ceiling is the relay's database work alone "
        f"({payload['ceiling_implementation']})."
    )
    p = payload.get("profile")
    if p:
        if p["tool"] == "py-spy":
            basis = f"{p['samples']:,} samples of the main thread, idle waits included"
        else:
            basis = f"{p['samples']:,} ms of the main thread, profiler overhead included"
        raw = os.path.relpath(p["raw"], REPO_ROOT)
        out += [
            "",
            f"Profile of one relay draining the same backlog ({p['tool']}, {p['seconds']:.1f} s, "
            f"{basis}; raw: {raw}):",
            "",
            table(
                ["function", "cumulative", "self"],
                [
                    [t["function"], f"{t['cumulative_pct']:.1f}%", f"{t['self_pct']:.1f}%"]
                    for t in p["top"]
                ],
            ),
        ]
        if p.get("innermost_relay_lines"):
            out += [
                "",
                "Where the relay's own code was (innermost relay/ frame, by line):",
                "",
                table(
                    ["relay line", "share"],
                    [[t["line"], f"{t['pct']:.1f}%"] for t in p["innermost_relay_lines"]],
                ),
            ]
    out += ["", *footer(payload)]
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
