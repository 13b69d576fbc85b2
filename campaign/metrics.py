"""Prometheus metrics, served at GET /metrics on every process's ops address.

One registry per process, defined once here, so roles created and torn down repeatedly
(tests, the demo) never register a metric twice. Labels stay bounded: services, outcomes,
statuses, kinds; never a campaign id (it grows without limit in a long-running worker;
per-campaign figures come from the database, see /api/campaigns on the ops address).
The names are public: deploy/grafana/campaign.json uses them and a test checks it.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

REGISTRY = CollectorRegistry(auto_describe=True)

# process_* (CPU, memory, open files, start time), python_info and python_gc_*: the same
# collectors the default registry carries, registered on ours.
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)

DESTINATIONS = Counter(
    "campaign_destinations_total",
    "Destinations by the outcome of their send attempt (the status the response gave).",
    ["service", "outcome"],
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
    "Delivery report items received, by result (stored, duplicate, rejected).",
    ["result"],
    registry=REGISTRY,
)
INCOMING = Counter(
    "campaign_incoming_messages_total",
    "Incoming messages (MO) received, by result (stored, duplicate, rejected).",
    ["result"],
    registry=REGISTRY,
)
FINAL_STATUSES = Counter(
    "campaign_recipients_final_total",
    "Recipients moved into a final status by this process, by status.",
    ["status"],
    registry=REGISTRY,
)
REPORT_DELAY_SECONDS = Histogram(
    "campaign_report_delay_seconds",
    "From the API accepting a message to its final delivery report's timestamp.",
    buckets=(1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400),
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
ROLE_UP = Gauge(
    "campaign_role_up",
    "1 for each role this process runs and has started (sender, webhooks, reconciler).",
    ["role"],
    registry=REGISTRY,
)
WINDOW_DEFERRED = Counter(
    "campaign_window_deferred_total",
    "Recipients held back at claim because their local sending window was shut, by what "
    "became of them (waiting for the opening, or expired).",
    ["service", "outcome"],
    registry=REGISTRY,
)
CAMPAIGNS_AUTO_PAUSED = Counter(
    "campaign_auto_paused_total",
    "Campaigns the worker paused because too many of their messages failed, by what "
    "judged them (canary, brake).",
    ["by"],
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


def count_final(counts: dict[str, int]) -> None:
    """Add recipients that just became final, {status: how many}."""
    for status, n in counts.items():
        if n:
            FINAL_STATUSES.labels(status).inc(n)


def render() -> tuple[bytes, str]:
    """The exposition body and its content type."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


_SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_count", "_sum"),
    "summary": ("_count", "_sum"),
    "info": ("_info",),
}


def names() -> set[str]:
    """Every series name this process exports, with or without samples yet (for dashboards)."""
    found: set[str] = set()
    for family in REGISTRY.collect():
        found.add(family.name)
        found |= {family.name + suffix for suffix in _SUFFIXES.get(family.type, ())}
        found |= {sample.name for sample in family.samples}
    return found
