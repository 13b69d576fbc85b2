"""The reconciler: stored delivery reports -> recipient statuses, and campaign completion.

Each pass runs a few set-based statements (sql/queries/reconciler.sql): match new reports
to recipients and apply the winning report per recipient, mark long-unmatched reports
orphaned, fail recipients whose final report never came, complete finished campaigns.
Reports for recipients the sender has not finished with wait, durably, in state 'new'.
A pass that finds nothing doubles the wait before the next, up to `[worker] idle_max_s`;
`wake()` (a report stored or a batch taken in this process) brings it back to interval_s.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import structlog

from campaign import codes, db, metrics, reports, statuses
from campaign.aio import IdleBackoff, wait_woken
from campaign.config import PolicySettings, ReconcilerSettings, ServiceSettings

log = structlog.get_logger(__name__)

_T = TypeVar("_T")

QUERIES = (
    "reconcile_match_reports",
    "reconcile_orphan_reports",
    "reconcile_report_timeout",
    "reconcile_lock_finished_campaigns",
    "reconcile_complete_campaigns",
    "reconcile_activity",
)


# A step normally takes well under a second. One stuck past this (a lock that is never
# released, a pathological plan) fails the pass loudly (`reconcile_failed`) and the next
# pass tries again, instead of the reconciler stalling in silence.
STEP_TIMEOUT_S = 30.0


class StepTimedOut(TimeoutError):
    """A step waited past STEP_TIMEOUT_S: for a pool connection, or for its statement."""

    def __init__(
        self,
        waited_for: str,
        statement: str,
        *,
        activity: list[dict[str, object]] | None = None,
        backend_pid: int | None = None,
        loop_late_s: float | None = None,
        plan: list[str] | str | None = None,
    ) -> None:
        super().__init__(f"{waited_for} of {statement} took over {STEP_TIMEOUT_S:.0f} s")
        self.waited_for = waited_for
        self.statement = statement
        # Taken while the statement still ran (None: take it when logging).
        self.activity = activity
        # The session that ran the statement, to find it in `activity`.
        self.backend_pid = backend_pid
        # How long after STEP_TIMEOUT_S the event loop noticed: a starved or blocked
        # process shows here, a slow server does not.
        self.loop_late_s = loop_late_s
        # The statement's plan (EXPLAIN) taken then: a pathological plan shows here.
        self.plan = plan


@contextlib.asynccontextmanager
async def _step(waited_for: str, statement: str) -> AsyncIterator[None]:
    """Name what a TimeoutError inside waited for, so the log can say it."""
    try:
        yield
    except TimeoutError as exc:
        if isinstance(exc, StepTimedOut):
            raise
        raise StepTimedOut(waited_for, statement) from exc


@dataclass(frozen=True, slots=True)
class ReconcileResult:
    """What one pass did."""

    reports_examined: int = 0
    reports_matched: int = 0
    recipients_updated: int = 0
    reports_orphaned: int = 0
    recipients_timed_out: int = 0
    campaigns_completed: int = 0
    # Learnt from reports ([policy]): transient failures sent once more, numbers suppressed.
    recipients_retried: int = 0
    suppressions_added: int = 0
    # The match step took a full batch: more reports may be waiting, run again at once.
    full: bool = False

    @property
    def reports_waiting(self) -> int:
        return self.reports_examined - self.reports_matched

    @property
    def did_work(self) -> bool:
        return bool(
            self.reports_matched
            or self.recipients_updated
            or self.reports_orphaned
            or self.recipients_timed_out
            or self.campaigns_completed
            or self.suppressions_added
        )


class Reconciler:
    def __init__(
        self,
        *,
        pool: db.Pool,
        settings: ReconcilerSettings,
        queries: Mapping[str, str],
        policy: PolicySettings | None = None,
        max_attempts: Mapping[str, int] | None = None,
        idle_max_s: float = 0.0,
    ) -> None:
        self._pool = pool
        self._settings = settings
        self._backoff = IdleBackoff(base_s=settings.interval_s, max_s=idle_max_s)
        self._wake = asyncio.Event()
        self._policy = policy or PolicySettings()
        # Each service's max_attempts, and '*' for a campaign of a service this process
        # has no config for (a retry must not outlive the attempts the sender allows).
        attempts = dict(max_attempts or {}) | {"*": ServiceSettings().max_attempts}
        self._services = list(attempts)
        self._max_attempts = list(attempts.values())
        self._queries = db.require(queries, QUERIES)
        # Every documented report code, with the status it leads to and its meaning.
        self._codes = sorted(set(reports.CODE_STATUS) | set(codes.REPORT_CODES))
        self._statuses = [reports.status_for_code(code) for code in self._codes]
        self._meanings = [codes.meaning(code) for code in self._codes]
        # Keyset cursor over new reports; back to 0 after a pass that was not full.
        self._after_id = 0
        self._last_sweep = -float("inf")

    def wake(self) -> None:
        """Reports or results are on their way: pass now, and every interval_s again."""
        self._backoff.reset()
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Pass every interval_s (longer while idle) until `stop` is set; again at once
        after a full pass."""
        while not stop.is_set():
            self._wake.clear()
            try:
                result = await self.run_once()
            except StepTimedOut as exc:
                await self._log_timeout(exc)
                result = ReconcileResult()
            except db.UNAVAILABLE_ERRORS as exc:
                log.warning("reconcile_failed", error=str(exc), error_type=type(exc).__name__)
                result = ReconcileResult()
            if result.full:
                continue
            wait_s = self._backoff.after(worked=result.did_work or result.reports_waiting > 0)
            await wait_woken(self._wake, stop, wait_s)

    async def run_once(self) -> ReconcileResult:
        """One pass: match, orphan, time out, complete. Outside a backlog, all of it is one
        transaction (an idle pass is one commit); in a backlog, `parallel` matches commit on
        their own and the sweeps, once per interval_s, together."""
        started = time.monotonic()
        s = self._settings
        after_id = self._after_id
        orphans: list[db.Record] = []
        timed_out: list[db.Record] = []
        completed: list[db.Record] = []
        if after_id:
            # Up to `parallel` match statements at once while a backlog waits: each takes
            # the next reports not locked by another (SKIP LOCKED), so they split the work.
            outcomes = await asyncio.gather(
                *(self._match(after_id) for _ in range(s.parallel)), return_exceptions=True
            )
            for outcome in outcomes:
                if isinstance(outcome, BaseException):
                    raise outcome
            matches = [m for m in outcomes if not isinstance(m, BaseException)]
            full = any(int(m["examined"]) >= s.batch_size for m in matches)
            # The sweeps look at every waiting report and running campaign; while a backlog
            # is matched in full passes they run once per interval_s, not after every pass
            # (the orphan sweep alone took a tenth of a 200,000-report backlog's time).
            if not full or started - self._last_sweep >= s.interval_s:
                self._last_sweep = started
                async with self._connection("sweeps") as conn, conn.transaction():
                    orphans, timed_out, completed = await self._sweep(conn)
        else:
            # Without a flush wait, as a backlog's matches (see _match): what the sweeps
            # write is derived as well, a lost commit's timeouts and completions are found
            # again by the next pass.
            async with self._connection("reconcile_match_reports") as conn, conn.transaction():
                await conn.execute("SET LOCAL synchronous_commit = off")
                matches = [await self._match_on(conn, 0)]
                full = int(matches[0]["examined"]) >= s.batch_size
                if not full or started - self._last_sweep >= s.interval_s:
                    self._last_sweep = started
                    orphans, timed_out, completed = await self._sweep(conn)
        # Committed: now counted and logged.
        for match in matches:
            metrics.count_final(dict(match["finals"]))
            for delay_s in match["delays_s"]:
                metrics.REPORT_DELAY_SECONDS.observe(delay_s)
        examined = sum(int(m["examined"]) for m in matches)
        self._after_id = max(int(m["last_id"] or 0) for m in matches) if full else 0
        self._log_sweep(orphans, timed_out, completed)

        result = ReconcileResult(
            reports_examined=examined,
            reports_matched=sum(int(m["matched"]) for m in matches),
            recipients_updated=sum(int(m["updated"]) for m in matches),
            recipients_retried=sum(int(m["retried"]) for m in matches),
            suppressions_added=sum(int(m["suppressed"]) for m in matches),
            reports_orphaned=len(orphans),
            recipients_timed_out=sum(int(r["recipients"]) for r in timed_out),
            campaigns_completed=len(completed),
            full=full,
        )
        if result.did_work:
            log.info(
                "reconcile_finished",
                reports_examined=result.reports_examined,
                reports_matched=result.reports_matched,
                reports_waiting=result.reports_waiting,
                recipients_updated=result.recipients_updated,
                reports_orphaned=result.reports_orphaned,
                recipients_timed_out=result.recipients_timed_out,
                campaigns_completed=result.campaigns_completed,
                recipients_retried=result.recipients_retried,
                suppressions_added=result.suppressions_added,
                duration_ms=round((time.monotonic() - started) * 1000),
            )
        return result

    @contextlib.asynccontextmanager
    async def _connection(self, statement: str) -> AsyncIterator[db.PoolConnection]:
        """A pool connection for `statement`, waited for up to STEP_TIMEOUT_S."""
        async with _step("pool_acquire", statement):
            conn = await self._pool.acquire(timeout=STEP_TIMEOUT_S)
        try:
            yield conn
        finally:
            await self._pool.release(conn)

    async def _match(self, after_id: int) -> db.Record:
        """One match statement in a backlog, in its own transaction."""
        # A match is derived data and needs no WAL flush of its own: should a crash lose
        # its commit, its reports are still 'new' (both writes are one statement) and the
        # next pass matches them again; any later durable commit (a sender's, the
        # receiver's) flushes it along, the WAL being one sequence.
        async with self._connection("reconcile_match_reports") as conn, conn.transaction():
            await conn.execute("SET LOCAL synchronous_commit = off")
            return await self._match_on(conn, after_id)

    async def _match_on(self, conn: db.PoolConnection, after_id: int) -> db.Record:
        """The match statement on `conn`: up to batch_size new reports after `after_id`."""
        s = self._settings
        match = await self._bounded(
            conn,
            "reconcile_match_reports",
            conn.fetchrow,
            after_id,
            s.batch_size,
            self._codes,
            self._statuses,
            self._meanings,
            reports.OTHER_CODE_STATUS,
            list(self._policy.retry_codes),
            self._policy.retry_after_s,
            self._services,
            self._max_attempts,
            list(self._policy.suppress_codes),
            self._policy.suppress_days,
        )
        assert match is not None
        return match

    async def _sweep(
        self, conn: db.PoolConnection
    ) -> tuple[list[db.Record], list[db.Record], list[db.Record]]:
        """Orphan long-unmatched reports, time out silent recipients, complete campaigns:
        in the caller's transaction on `conn`."""
        s = self._settings
        orphans = await self._bounded(
            conn, "reconcile_orphan_reports", conn.fetch, s.orphan_after_s, s.batch_size
        )
        timed_out = await self._bounded(
            conn, "reconcile_report_timeout", conn.fetch, s.report_timeout_s, s.batch_size
        )
        # Lock the campaigns that look finished, then look again with a fresh snapshot (each
        # statement takes its own): a recipient inserted meanwhile is either seen by the
        # second look or reopens the campaign once the lock is released (reconciler.sql).
        finished = await self._bounded(conn, "reconcile_lock_finished_campaigns", conn.fetch)
        completed: list[db.Record] = []
        if finished:
            completed = await self._bounded(
                conn, "reconcile_complete_campaigns", conn.fetch, [row["id"] for row in finished]
            )
        return orphans, timed_out, completed

    def _log_sweep(
        self, orphans: list[db.Record], timed_out: list[db.Record], completed: list[db.Record]
    ) -> None:
        """What a committed sweep did."""
        s = self._settings
        for row in orphans:
            log.warning(
                "report_orphaned",
                report_id=row["id"],
                transid=row["transid"],
                correlation_id=row["correlation_id"],
                code=row["code"],
                orphan_after_s=s.orphan_after_s,
            )
        metrics.count_final({"failed": sum(int(row["recipients"]) for row in timed_out)})
        for row in timed_out:
            log.warning(
                "reports_timed_out",
                campaign_id=row["campaign_id"],
                recipients=row["recipients"],
                report_timeout_s=s.report_timeout_s,
            )

        for row in completed:
            counts: Mapping[str, int] = row["counts"]
            per_status = {status: int(counts.get(status, 0)) for status in statuses.FINAL}
            recipients = sum(counts.values())
            # A campaign that completed without reaching most of its recipients says so.
            never_sent = sum(per_status[s] for s in statuses.NEVER_SENT)
            if recipients and never_sent >= statuses.MOSTLY_INVALID * recipients:
                log.warning(
                    "campaign_completed",
                    campaign_id=row["campaign_id"],
                    recipients=recipients,
                    **per_status,
                    hint="most recipients were not sent: see `campaign status ID` for why",
                )
            else:
                log.info(
                    "campaign_completed",
                    campaign_id=row["campaign_id"],
                    recipients=recipients,
                    **per_status,
                )

    async def _bounded(
        self,
        conn: db.PoolConnection,
        statement: str,
        fetch: Callable[..., Awaitable[_T]],
        *args: object,
    ) -> _T:
        """Run the named statement with `fetch` (a method of `conn`) for up to
        STEP_TIMEOUT_S; past that, take a snapshot of the database's sessions and of the
        plan the statement gets while it still runs, then cancel it."""
        task = asyncio.ensure_future(fetch(self._queries[statement], *args))
        started = time.monotonic()
        done, _ = await asyncio.wait({task}, timeout=STEP_TIMEOUT_S)
        if task in done:
            return task.result()
        loop_late_s = round(time.monotonic() - started - STEP_TIMEOUT_S, 3)
        activity = await self._activity()
        plan = await self._plan(statement, args)
        task.cancel()  # asyncpg asks the server to cancel the statement
        await asyncio.wait({task}, timeout=STEP_TIMEOUT_S)
        raise StepTimedOut(
            "statement",
            statement,
            activity=activity if isinstance(activity, list) else None,
            backend_pid=conn.get_server_pid(),
            loop_late_s=loop_late_s,
            plan=plan,
        )

    async def _plan(self, statement: str, args: tuple[object, ...]) -> list[str] | str:
        """The plan `statement` gets with these arguments now (EXPLAIN: planned, not run),
        or why it is unknown. Statistics that changed since the stuck statement was planned
        can make it differ; usually it is the same plan."""
        rows = await self._probe("EXPLAIN " + self._queries[statement], *args)
        return rows if isinstance(rows, str) else [str(r[0]) for r in rows]

    async def _activity(self) -> list[dict[str, object]] | str:
        """The database's busy sessions (reconcile_activity), or why they are unknown."""
        rows = await self._probe(self._queries["reconcile_activity"])
        return rows if isinstance(rows, str) else [dict(r) for r in rows]

    async def _probe(self, sql: str, *args: object) -> list[db.Record] | str:
        """`sql` on another pool connection within a few seconds, or why it could not run."""
        probe_s = min(5.0, STEP_TIMEOUT_S)
        try:
            async with self._pool.acquire(timeout=probe_s) as conn:
                return await conn.fetch(sql, *args, timeout=probe_s)
        except db.UNAVAILABLE_ERRORS as probe:
            return f"not available: {type(probe).__name__}"

    async def _log_timeout(self, exc: StepTimedOut) -> None:
        """Say what the step waited for, with what the database's sessions were doing."""
        activity = exc.activity if exc.activity is not None else await self._activity()
        log.error(
            "reconcile_failed",
            error=str(exc),
            error_type="StepTimedOut",
            waited_for=exc.waited_for,
            statement=exc.statement,
            backend_pid=exc.backend_pid,
            loop_late_s=exc.loop_late_s,
            pool_size=self._pool.get_size(),
            pool_idle=self._pool.get_idle_size(),
            activity=activity,
            plan=exc.plan,
        )
