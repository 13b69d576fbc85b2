"""`campaign simulate`: a fault-injecting simulator of the IMIconnect messaging API v1.

It answers `POST /resources/v1/messaging` as the real API does (HTTP 200 with a single
`response` object for errors, a list with one item per destination on success), limits
destinations per key with a token bucket, later POSTs delivery reports to each request's
`notifyurl` (retrying failed callbacks), sends MOs on demand, injects faults on a
probability or a schedule, and counts everything it accepted at `GET /simulate/stats`.

The accept path is the hot one (100,000+ destinations/s in 1000-destination requests):
counters instead of per-destination records, one validation pass and one accept pass per
request, reports scheduled in time buckets and POSTed over a bounded connection pool.

Modules, each importing only those above it:

    api          paths, report codes, request limits and formats
    timestamps   timestamps written in reports and MOs, `expiry` read from requests
    parts        SMS parts of a text (own GSM-7 tables)
    config       SimulatorConfig, Faults, FaultSpec, SimulatorConfigError
    validation   request parsing and validation (RequestError)
    ratelimit    TokenBucket, the per-key rate limit
    stats        the counters of GET /simulate/stats
    reports      delivery reports: planned, then rendered
    callbacks    the sender of reports and MOs (retries, one connection pool)
    server       Simulator and start_simulator: the HTTP side and the accept path
    cli          `campaign simulate` (cmd_simulate, config_from_args)
"""

from __future__ import annotations

from campaign.simulator.api import MESSAGING_PATH, MO_PATH, RESET_PATH, STATS_PATH
from campaign.simulator.cli import cmd_simulate
from campaign.simulator.config import Faults, FaultSpec, SimulatorConfig, SimulatorConfigError
from campaign.simulator.server import Simulator, start_simulator

__all__ = [
    "MESSAGING_PATH",
    "MO_PATH",
    "RESET_PATH",
    "STATS_PATH",
    "FaultSpec",
    "Faults",
    "Simulator",
    "SimulatorConfig",
    "SimulatorConfigError",
    "cmd_simulate",
    "start_simulator",
]
