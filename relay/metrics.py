"""Prometheus metrics of one relay process (one registry per Relay, so tests can make many)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
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
            "relay_http_request_seconds",
            "Latency of HTTP requests to Customer.io",
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
            "relay_backlog_messages", "Unfinished messages by state", ["state"], registry=r
        )
        self.oldest = Gauge(
            "relay_backlog_oldest_seconds", "Age of the oldest unfinished message", registry=r
        )
        self.rescues = Counter(
            "relay_lease_rescues_total", "In-flight messages whose lease expired", registry=r
        )
        self.paused = Gauge(
            "relay_destinations_paused", "Destinations paused for a rejected key", registry=r
        )
