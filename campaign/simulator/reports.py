"""Delivery reports: planned per destination (outcome, delay, faults), then rendered."""

from __future__ import annotations

import itertools
import random
import time
import uuid
from datetime import tzinfo
from typing import Any, NamedTuple

from campaign.simulator.api import DR_CODES, INTERIM_CODE
from campaign.simulator.config import REPORT_FAULTS, SimulatorConfig
from campaign.simulator.stats import _Counter
from campaign.simulator.timestamps import format_timestamp
from campaign.simulator.validation import _Context


class _Report(NamedTuple):
    """One delivery report to send; its timestamp is fixed when planned, so a retried or
    duplicated report is the same report."""

    context: _Context
    code: str
    transid: str
    msisdn: str
    correlation_id: str | None
    event_at: float
    # "" for the documented UTC form, an offset like "+05:30", or None for no timeStamp.
    offset: str | None
    # False: the report carries only the correlation id (the transid_missing fault).
    with_transid: bool = True


def render_report(
    report: _Report, *, extra_fields: bool, zone: tzinfo | None = None
) -> dict[str, Any]:
    """A report in the documented `deliveryInfoNotification` shape; an offset-less
    timestamp is written in `zone` (None: UTC)."""
    status, description = DR_CODES[report.code]
    info: dict[str, Any] = {
        "deliveryChannel": "SMS",
        "Description": description,
        "destinationType": "msisdn",
    }
    if report.offset is not None:
        info["timeStamp"] = format_timestamp(report.event_at, report.offset, zone=zone)
    info["code"] = report.code
    info["deliveryStatus"] = status
    info["destination"] = report.msisdn
    if extra_fields:
        info["messageCount"] = report.context.message_count
        info["carrier"] = "Simulated Carrier"
    notification: dict[str, Any] = {"deliveryInfo": info}
    if report.correlation_id is not None:
        notification["correlationid"] = report.correlation_id
    if report.context.callback_data is not None:
        notification["callbackData"] = report.context.callback_data
    if report.with_transid:
        notification["transid"] = report.transid
    return {"deliveryInfoNotification": notification}


class _ReportPlanner:
    """Plans the reports of one request: outcome, delays and per-report faults.

    Every report is stamped with the wall-clock time of its event when planned, so a
    retried or duplicated report carries the same timestamp as the original.
    """

    def __init__(
        self,
        *,
        config: SimulatorConfig,
        rnd: random.Random,
        request_no: int,
        elapsed: float,
        immediate: bool,
    ) -> None:
        faults = config.faults
        self._config = config
        self._random = rnd.random
        self._expovariate = rnd.expovariate
        self._wall = time.time()
        self.immediate = immediate
        self._by_msisdn = config.dr_codes_by_msisdn
        codes = list(config.dr_outcomes)
        total = sum(config.dr_outcomes.values())
        self._codes = codes
        self._edges = list(itertools.accumulate(w / total for w in config.dr_outcomes.values()))
        self._single_code = codes[0] if len(codes) == 1 else ""
        self._uniform = config.dr_delay_distribution == "uniform"
        self._min_s = config.dr_delay_min_s
        self._span_s = config.dr_delay_max_s - config.dr_delay_min_s
        self._probability = {
            name: getattr(faults, name).applies(request_no, elapsed) for name in REPORT_FAULTS
        }
        self._fast = (
            not any(self._probability.values()) and config.dr_interim_ratio == 0 and not immediate
        )
        self.planned: list[tuple[float, _Report]] = []
        self.faults = _Counter()
        # (correlation id, transid) of destinations whose reports leave the transid out:
        # the only record of that pair, for a ledger that reads pairs from the reports.
        self.transids_omitted: list[tuple[str, str]] = []

    def _delay(self) -> float:
        if self._uniform:
            return self._min_s + self._span_s * self._random()
        c = self._config
        if c.dr_delay_distribution == "fixed":
            return self._min_s
        spread = c.dr_delay_mean_s - self._min_s
        return min(c.dr_delay_max_s, self._min_s + self._expovariate(1.0 / spread))

    def _pick_code(self) -> str:
        draw = self._random()
        for code, edge in zip(self._codes, self._edges, strict=True):
            if draw < edge:
                return code
        return self._codes[-1]

    def _hit(self, name: str) -> bool:
        probability = self._probability[name]
        if probability <= 0.0 or (probability < 1.0 and self._random() >= probability):
            return False
        self.faults.add(name)
        return True

    def plan(self, context: _Context, transid: str, msisdn: str, correlation: str | None) -> None:
        code = self._by_msisdn.get(msisdn) if self._by_msisdn else None
        if code is None:
            code = self._single_code or self._pick_code()
        if self._fast:
            delay = self._min_s + self._span_s * self._random() if self._uniform else self._delay()
            report = _Report(context, code, transid, msisdn, correlation, self._wall + delay, "")
            self.planned.append((delay, report))
            return
        self._plan_with_faults(context, code, transid, msisdn, correlation)

    def _plan_with_faults(
        self, context: _Context, code: str, transid: str, msisdn: str, correlation: str | None
    ) -> None:
        if self._hit("lost_report"):
            return
        offset: str | None = ""
        if self._hit("timestamp_missing"):
            offset = None
        elif self._hit("timestamp_offset"):
            offset = self._config.timestamp_offset
        # Only with a correlation id: a report with neither cannot be matched by anyone.
        with_transid = correlation is None or not self._hit("transid_missing")
        if not with_transid:
            assert correlation is not None
            self.transids_omitted.append((correlation, transid))
        interim = self._random() < self._config.dr_interim_ratio
        out_of_order = self._hit("out_of_order")
        wall = self._wall

        def add(send_at: float, report_code: str, event_at: float, tid: str = transid) -> None:
            mine = tid == transid
            cid = correlation if mine else f"unknown-{tid[:8]}"
            report = _Report(
                context,
                report_code,
                tid,
                msisdn,
                cid,
                wall + event_at,
                offset,
                with_transid or not mine,
            )
            self.planned.append((send_at, report))

        first = 0.0 if self.immediate else self._delay()
        final_at = first
        if out_of_order:
            # The final report goes first; the interim one, stamped earlier, arrives after.
            add(first, code, first)
            add(first + self._delay(), INTERIM_CODE, first / 2)
        elif interim:
            add(first, INTERIM_CODE, first)
            final_at = first + self._delay()
            add(final_at, code, final_at)
        else:
            add(first, code, first)
        if self._hit("duplicate_report"):
            add(final_at + self._config.faults.duplicate_report.delay_s, code, final_at)
        if self._hit("unknown_transid"):
            add(final_at, code, final_at, str(uuid.uuid4()))
