"""Prometheus metrics of one relay process (one registry per Relay, so tests can make many).

Names follow Prometheus' conventions: base units in the name (``_seconds``), counters end in
``_total``, durations are ``_duration_seconds``. Each registry also carries the standard
process, platform and garbage-collector collectors (``process_*``, ``python_*``), as the
default registry would.

No ``_created`` series: one more series per counter and histogram child, which Prometheus
does not need (it detects counter resets itself). ``disable_created_metrics`` is process-wide;
the relay is a process of its own, and an application embedding it loses only those series.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)

from relay.models.states import UNFINISHED_STATES

disable_created_metrics()  # type: ignore[no-untyped-call]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.messages = Counter(
            "relay_messages_total",
            "Messages by outcome of a request (delivered, retrying, dead, held), by AppFunnel "
            "event and message kind",
            ["destination", "event", "kind", "outcome"],
            registry=r,
        )
        self.coalesced = Counter(
            "relay_messages_coalesced_total",
            "Identifies merged into a later identify of the same customer",
            ["destination"],
            registry=r,
        )
        self.requests = Counter(
            "relay_http_requests_total",
            "HTTP requests to Customer.io by status code (or transport error kind)",
            ["destination", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "relay_http_request_duration_seconds",
            "Duration of HTTP requests to Customer.io",
            ["destination"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.batch_size = Histogram(
            "relay_batch_messages",
            "Messages per HTTP request",
            buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500, 1000),
            registry=r,
        )
        self.backlog = Gauge(
            "relay_backlog_messages",
            "Unfinished messages by state (the whole outbox, not only this relay's)",
            ["state"],
            registry=r,
        )
        # Every state is a series from the start, so a query or alert never sees it missing.
        for state in UNFINISHED_STATES:
            self.backlog.labels(state)
        self.oldest = Gauge(
            "relay_backlog_oldest_seconds",
            "Age of the oldest unfinished message (the whole outbox)",
            registry=r,
        )
        self.rescues = Counter(
            "relay_lease_rescues_total", "In-flight messages whose lease expired", registry=r
        )
        self.paused = Gauge(
            "relay_destinations_paused",
            "Destinations paused for a rejected write key (401/403)",
            registry=r,
        )
        self.loop_age = Gauge(
            "relay_delivery_last_cycle_age_seconds",
            "Seconds since the delivery loop last finished a cycle (NaN: no loop in this process)",
            registry=r,
        )
        self.loop_age.set_function(lambda: math.nan)
        self.loop_stuck_after = Gauge(
            "relay_delivery_stuck_after_seconds",
            "Last-cycle age beyond which /livez reports the delivery loop stuck",
            registry=r,
        )
        self.loop_stuck_after.set(math.nan)

    def watch_delivery_loop(self, age_s: Callable[[], float], stuck_after_s: float) -> None:
        """Export the loop's last-cycle age (read at each scrape) and the /livez bound."""
        self.loop_age.set_function(age_s)
        self.loop_stuck_after.set(stuck_after_s)
