"""``GET /metrics``: Prometheus text for one server. Requests by route and status, pages and new tokens
done, the time from a page queued for the batch to its record, requests waiting to be queued, pages
waiting for a slot and pages in the batch. Each app has its own registry (no process-wide state)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..results import PageResult
from .bridge import Bridge

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

# Page latency: a short page on a warm GPU takes well under a second, a dense one at 3,072 tokens a minute.
PAGE_SECONDS = (0.25, 0.5, 1, 2, 5, 10, 20, 40, 80, 160, 320)


class Metrics:
    def __init__(self, bridge: Bridge):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("kosmos_requests", "Requests answered, by route and status", ["route", "status"],
                                registry=registry)
        self.pages = Counter("kosmos_pages", "Pages done (failed ones included)", registry=registry)
        self.new_tokens = Counter("kosmos_new_tokens", "Tokens generated and kept, EOS included", registry=registry)
        self.page_seconds = Histogram("kosmos_page_seconds", "From a page queued for the batch to its record",
                                      buckets=PAGE_SECONDS, registry=registry)
        Gauge("kosmos_waiting_requests", "Requests with pages not yet queued for the batch",
              registry=registry).set_function(lambda: bridge.waiting)
        Gauge("kosmos_queued_pages", "Pages rendered and waiting for a slot",
              registry=registry).set_function(lambda: len(bridge.pages))
        Gauge("kosmos_busy_slots", "Pages in the batch", registry=registry).set_function(
            lambda: max(0, bridge.busy - len(bridge.pages)))
        Gauge("kosmos_slots", "Pages the batch decodes together (every worker's; fewer after running out of "
              "memory or losing a worker)", registry=registry).set_function(lambda: bridge.slots)

    def page_done(self, record: PageResult, seconds: float) -> None:
        self.pages.inc()
        self.new_tokens.inc(record.new_tokens or 0)
        self.page_seconds.observe(seconds)

    def text(self) -> bytes:
        return generate_latest(self.registry)
