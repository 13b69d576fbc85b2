"""The dashboard in a real browser: headless Chromium (Debian's `chromium`; .ci/run
installs it) opens the ops address of a worker sending a campaign, and the rendered DOM
must show the campaign's numbers and charts, follow the campaign as it progresses, and
leave no error in the console. The `campaign report --html` file is opened the same way.
Screenshots go to the test's temporary folder for a person to look at.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from campaign.simulator import Simulator, SimulatorConfig, start_simulator
from tests.helpers.browser import browser, chromium_path
from tests.helpers.proc import (
    SERVICE_KEY,
    Processes,
    free_port,
    wait_until,
    webhooks_at,
    write_config,
)
from tests.helpers.seed import campaign_status, campaign_with_recipients, statuses

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(
        chromium_path() is None,
        reason="chromium is not installed (apt-get install chromium; .ci/run does it)",
    ),
]

RECIPIENTS = 3000
# Slow enough that the page sees the campaign in progress on any machine.
RATE_PER_S = 250.0


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    config = SimulatorConfig(
        keys=(SERVICE_KEY,),
        dr_delay_min_s=0.05,
        dr_delay_max_s=0.5,
        seed=11,
        dr_outcomes={"7500": 0.9, "7203": 0.1},
    )
    async with await start_simulator(config) as simulator:
        yield simulator


def js(expression: str) -> str:
    return expression.strip()


FUNNEL = js("""
Object.fromEntries([...document.querySelectorAll('#funnel .bar')]
  .map(b => [b.dataset.status, Number(b.dataset.count)]))
""")


async def test_the_dashboard_follows_a_campaign_in_chromium(
    sim: Simulator, conn: asyncpg.Connection, dsn: str, tmp_path: Path, campaign_process: Processes
) -> None:
    cfg = write_config(
        tmp_path / "c.toml",
        api={"base_url": sim.base_url},
        services={"default": {"rate_per_s": RATE_PER_S, "batch_size": 50}},
        webhooks=webhooks_at(free_port()),
        ops={"refresh_s": 0.5},
    )
    cid = await campaign_with_recipients(
        conn, RECIPIENTS, name="Diwali <b>offer</b>", status="draft"
    )
    worker = await campaign_process.start("worker", config=cfg, dsn=dsn)
    url = await worker.ops_url()
    await worker.wait_http(f"{url}/readyz")
    async with browser(tmp_path) as page:
        await page.goto(url + "/")
        # Before sending: the campaign is listed, a draft, nothing final.
        await page.wait_for(f"document.querySelector('#campaigns tr[data-id=\"{cid}\"]') !== null")
        name = await page.evaluate(
            f"document.querySelector('#campaigns tr[data-id=\"{cid}\"] .name').textContent"
        )
        # Text from the database is text, never markup.
        assert name == "Diwali <b>offer</b>"
        assert await page.evaluate("document.querySelector('#campaigns b') === null")
        await conn.execute("UPDATE campaign.campaigns SET status = 'ready' WHERE id = $1", cid)

        # In progress: the page shows some but not all recipients final, then more.
        progress = js(f"""
(() => {{
  const row = document.querySelector('#campaigns tr[data-id="{cid}"]');
  const v = Number(row.querySelector('.progress').dataset.value);
  return row.dataset.status === 'running' && v > 0 && v < 1 ? v : 0;
}})()
""")
        first = await page.wait_for(progress, timeout_s=120)
        updates = int(await page.evaluate("document.body.dataset.updates"))
        # Later: more final (completed by then counts too: 1 > first).
        row = f"document.querySelector('#campaigns tr[data-id=\"{cid}\"]')"
        shown = f"Number({row}.querySelector('.progress').dataset.value)"
        await page.wait_for(f"{shown} > {first}", timeout_s=120)
        # A refresh renders the list before it counts itself: wait for the count to follow.
        await page.wait_for(f"Number(document.body.dataset.updates) > {updates}")
        await page.screenshot(tmp_path / "dashboard-running.png")

        async def completed() -> bool:
            return await campaign_status(conn, cid) == "completed"

        await wait_until(completed, timeout_s=180, what="the campaign to complete")
        final = await statuses(conn, cid)
        # Finished: the funnel holds the database's counts, the charts have drawn the
        # sends and reports, the delay percentiles and the failures table are filled.
        await page.wait_for(
            f"document.querySelector('#campaigns tr[data-id=\"{cid}\"]').dataset.status"
            " === 'completed'"
        )
        await page.wait_for(f"JSON.stringify({FUNNEL}) !== '{{}}'")
        funnel = await page.wait_for(
            js(f"""
(() => {{ const f = {FUNNEL}; return f.delivered === {final.get("delivered", 0)} ? f : null; }})()
"""),
        )
        assert {s: n for s, n in funnel.items() if n} == final
        assert await page.evaluate("document.querySelector('#detail').dataset.id") == str(cid)
        for chart in ("chart-sends", "chart-reports"):
            path = await page.evaluate(
                f"document.querySelector('#{chart} svg path.line')?.getAttribute('d')"
            )
            assert path and path.count("L") >= 1, chart
        p50 = await page.evaluate(
            "document.querySelector('#delay [data-p=\"p50\"] .v').textContent"
        )
        assert p50 != "\u2013"  # the page's "no value"
        if final.get("failed"):
            rows = await page.evaluate(
                "[...document.querySelectorAll('#failures tbody tr')].map(r => r.dataset.code)"
            )
            assert rows, "failed recipients but no failure rows"
        await page.screenshot(tmp_path / "dashboard.png")
        assert page.errors == []

        # The report file: the same page, one campaign, opened from disk.
        report = tmp_path / "report.html"
        done = await campaign_process.run(
            "report", str(cid), "--html", str(report), config=cfg, dsn=dsn
        )
        assert done.returncode == 0, done.output()
        await page.goto(report.as_uri())
        await page.wait_for("document.body.dataset.updates === '1'")
        assert await page.evaluate("document.querySelector('#list-card').hidden") is True
        title = await page.evaluate("document.querySelector('#detail-title').textContent")
        assert title == f"#{cid} Diwali <b>offer</b>"
        assert json.loads(json.dumps(await page.evaluate(FUNNEL)))["delivered"] == final.get(
            "delivered", 0
        )
        assert await page.evaluate("document.querySelector('#chart-sends svg path.line') !== null")
        await page.screenshot(tmp_path / "report.png")
        assert page.errors == []
    print(f"screenshots: {tmp_path}/dashboard-running.png, dashboard.png, report.png")
