"""Prometheus metrics, served at GET /metrics by the webhook receiver.

One registry per process, defined once here, so roles created and torn down repeatedly
(tests, the demo) never register a metric twice.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

REGISTRY = CollectorRegistry(auto_describe=True)

DESTINATIONS = Counter(
    "campaign_destinations_total",
    "Destinations by the outcome of their send attempt.",
    ["campaign_id", "service", "outcome"],
    registry=REGISTRY,
)
REQUESTS = Counter(
    "campaign_requests_total",
    "Requests to the messaging API by outcome.",
    ["service", "outcome"],
    registry=REGISTRY,
)
REQUEST_SECONDS = Histogram(
    "campaign_request_duration_seconds",
    "Time from sending a request to reading its response.",
    ["service"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
REPORTS = Counter(
    "campaign_reports_total",
    "Webhook items stored, by kind (dr, mo) and result (stored, duplicate, rejected).",
    ["kind", "result"],
    registry=REGISTRY,
)
REPORT_LAG_SECONDS = Gauge(
    "campaign_report_lag_seconds",
    "Age of the oldest delivery report not yet matched to its recipient.",
    registry=REGISTRY,
)
QUEUE_DEPTH = Gauge(
    "campaign_queue_depth",
    "Batches waiting between producer and senders, per service.",
    ["service"],
    registry=REGISTRY,
)
IN_FLIGHT = Gauge(
    "campaign_in_flight_requests",
    "Requests in flight per service.",
    ["service"],
    registry=REGISTRY,
)
EFFECTIVE_RATE = Gauge(
    "campaign_effective_rate_per_second",
    "Destinations per second a service may send now (lowered on 7020).",
    ["service"],
    registry=REGISTRY,
)
EVENTS_FORWARDED = Counter(
    "campaign_events_forwarded_total",
    "Events POSTed to [events] forward_url and answered 2xx.",
    registry=REGISTRY,
)
EVENTS_FORWARD_FAILURES = Counter(
    "campaign_events_forward_failures_total",
    "POSTs to [events] forward_url that failed (not 2xx, timeout, connection).",
    registry=REGISTRY,
)
EVENTS_FORWARD_SECONDS = Histogram(
    "campaign_events_forward_duration_seconds",
    "Time of one successful POST of events to [events] forward_url.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
EVENTS_BACKLOG = Gauge(
    "campaign_events_forward_backlog",
    "Events written and not yet forwarded (by id; set by the worker holding the lease).",
    registry=REGISTRY,
)


def render() -> tuple[bytes, str]:
    """The exposition body and its content type."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
