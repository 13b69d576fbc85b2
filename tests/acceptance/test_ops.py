"""Every process serves its ops address: the docker-compose topology as real processes.

One `campaign webhooks` (receiver + reconciler) and two sending-only workers
(`--no-webhooks --no-reconciler`, one config file, each its own `--ops-listen`), against
the simulator: each answers /healthz, /readyz and /metrics on its own ops address, and the
senders' metrics carry the sending figures (and no campaign id). A port already taken
stops a worker at once with one line and exit 2.
"""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from campaign import db
from campaign.simulator import Simulator, SimulatorConfig, start_simulator
from tests.helpers.proc import (
    SERVICE_KEY,
    CampaignProcess,
    Processes,
    free_port,
    wait_until,
    webhooks_at,
    write_config,
)
from tests.helpers.seed import campaign_status, campaign_with_recipients


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    config = SimulatorConfig(keys=(SERVICE_KEY,), dr_delay_min_s=0.0, dr_delay_max_s=0.05, seed=3)
    async with await start_simulator(config) as simulator:
        yield simulator


async def _get(http: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with http.get(url) as resp:
        return resp.status, await resp.text()


def _samples(text: str, name: str) -> dict[str, float]:
    """`name`'s samples in a Prometheus text body: {labels text: value}."""
    found = {}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            labels, _, value = line.rpartition(" ")
            found[labels[len(name) :]] = float(value)
    return found


async def _start_sender(
    campaign_process: Processes, cfg: Path, dsn: str, port: int, name: str
) -> CampaignProcess:
    """A sending-only worker (no receiver, no reconciler) with its own ops address."""
    return await campaign_process.start(
        "worker",
        "--worker-id",
        name,
        "--no-webhooks",
        "--no-reconciler",
        "--ops-listen",
        f"127.0.0.1:{port}",
        config=cfg,
        dsn=dsn,
        name=name,
    )


async def test_a_senders_lane_gauges_are_on_metrics_before_its_first_stats_turn(
    sim: Simulator, dsn: str, tmp_path: Path, campaign_process: Processes
) -> None:
    """A scrape right after start-up sees every lane's gauges (at zero), not an absent
    series: a stats turn (here an hour away) must not be what creates them."""
    cfg = write_config(
        tmp_path / "sender.toml",
        api={"base_url": sim.base_url},
        webhooks=webhooks_at(free_port()),
        worker={"stats_interval_s": 3600},
    )
    sender = await _start_sender(campaign_process, cfg, dsn, free_port(), "sender")
    url = await sender.ops_url()
    await sender.wait_http(f"{url}/readyz")
    async with aiohttp.ClientSession() as http:
        status, text = await _get(http, f"{url}/metrics")
    assert status == 200
    assert _samples(text, "campaign_queue_depth") == {'{service="default"}': 0.0}
    assert _samples(text, "campaign_in_flight_requests") == {'{service="default"}': 0.0}
    assert '{service="default"}' in _samples(text, "campaign_effective_rate_per_second")


@pytest.mark.timeout(180)
async def test_sender_only_workers_answer_health_ready_and_metrics(
    sim: Simulator, conn: asyncpg.Connection, dsn: str, tmp_path: Path, campaign_process: Processes
) -> None:
    hook_port = free_port()
    cfg = write_config(
        tmp_path / "fleet.toml",
        api={"base_url": sim.base_url},
        webhooks=webhooks_at(hook_port),
        worker={"stats_interval_s": 0.5},
    )
    campaign_id = await campaign_with_recipients(conn, 300, name="ops")
    webhooks = await campaign_process.start("webhooks", config=cfg, dsn=dsn)
    ports = [free_port(), free_port()]
    senders: list[CampaignProcess] = [
        await _start_sender(campaign_process, cfg, dsn, port, f"sender{i}")
        for i, port in enumerate(ports)
    ]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    assert [await s.ops_url() for s in senders] == urls
    hooks_ops = await webhooks.ops_url()
    # Ready once every role has started. On a loaded machine one sender can still be
    # starting when the other has sent all 300 (seen in a full run: 503 roles_starting).
    for process, url in [*zip(senders, urls, strict=True), (webhooks, hooks_ops)]:
        await process.wait_http(f"{url}/readyz")

    async def completed() -> bool:
        return await campaign_status(conn, campaign_id) == "completed"

    await wait_until(completed, timeout_s=120, what="the campaign to complete")

    async with aiohttp.ClientSession() as http:
        for url, roles in [(u, ["sender"]) for u in urls] + [
            (hooks_ops, ["reconciler", "webhooks"])
        ]:
            status, _ = await _get(http, f"{url}/healthz")
            assert status == 200, url
            async with http.get(f"{url}/readyz") as resp:
                assert resp.status == 200, await resp.text()
                ready = await resp.json()
            assert ready["status"] == "ok"
            assert ready["schema_version"] == db.expected_version()
            assert ready["roles"] == roles and ready["roles_starting"] == []

        sent = 0.0
        for url in urls:
            status, text = await _get(http, f"{url}/metrics")
            assert status == 200
            assert "campaign_id" not in text
            # The process collector, and the sending figures of this worker.
            assert _samples(text, "process_cpu_seconds_total")
            assert _samples(text, "campaign_queue_depth") == {'{service="default"}': 0.0}
            assert '{service="default"}' in _samples(text, "campaign_effective_rate_per_second")
            assert _samples(text, "campaign_role_up") == {'{role="sender"}': 1.0}
            sent += _samples(text, "campaign_destinations_total").get(
                '{outcome="queued",service="default"}', 0.0
            )
        # Both workers' counters together: every recipient accepted once.
        assert sent == 300

        status, text = await _get(http, f"{hooks_ops}/metrics")
        assert status == 200
        delivered = _samples(text, "campaign_recipients_final_total")
        assert sum(delivered.values()) == 300
        # The report delay histogram saw every final report the reconciler applied.
        assert _samples(text, "campaign_report_delay_seconds_count")[""] == 300
        assert _samples(text, "campaign_reports_total")
        # The receiver still serves its own /healthz and /metrics on the webhook port.
        status, _ = await _get(http, f"http://127.0.0.1:{hook_port}/healthz")
        assert status == 200


async def test_a_taken_ops_port_stops_the_worker_with_one_line(
    dsn: str, tmp_path: Path, campaign_process: Processes
) -> None:
    cfg = write_config(tmp_path / "c.toml")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        worker = await campaign_process.start(
            "worker", "--ops-listen", f"127.0.0.1:{port}", config=cfg, dsn=dsn
        )
        assert await worker.wait() == 2
    errors = [e for e in worker.events() if e.get("level") == "error"]
    assert len(errors) == 1, worker.output()
    message = str(errors[0]["error"])
    assert f"[ops] listen 127.0.0.1:{port}: address already in use" in message
    assert "--ops-listen" in message
    assert "Traceback" not in worker.log()
    assert "worker_started" not in worker.event_names()


async def test_a_malformed_ops_listen_is_refused(
    dsn: str, tmp_path: Path, campaign_process: Processes
) -> None:
    cfg = write_config(tmp_path / "c.toml")
    worker = await campaign_process.run("worker", "--ops-listen", "9100", config=cfg, dsn=dsn)
    assert worker.returncode == 2
    assert "--ops-listen: '9100' is not HOST:PORT" in worker.log()


async def test_report_writes_json_or_one_self_contained_html_file(
    conn: asyncpg.Connection, dsn: str, tmp_path: Path, campaign_process: Processes
) -> None:
    cfg = write_config(tmp_path / "c.toml")
    campaign_id = await campaign_with_recipients(conn, 5, name="</script><b>x</b>")
    out = await campaign_process.run("report", str(campaign_id), config=cfg, dsn=dsn)
    assert out.returncode == 0, out.output()
    detail = json.loads(out.stdout())
    assert detail["id"] == campaign_id and detail["counts"]["pending"] == 5

    html = tmp_path / "report.html"
    out = await campaign_process.run(
        "report", str(campaign_id), "--html", str(html), config=cfg, dsn=dsn
    )
    assert out.returncode == 0, out.output()
    text = html.read_text(encoding="utf-8")
    # The figures inside, the name unable to end the script element early.
    assert '<script id="campaign-data" type="application/json">' in text
    assert "</script><b>" not in text
    embedded = text.split('<script id="campaign-data" type="application/json">')[1]
    data = json.loads(embedded.split("</script>")[0].replace("<\\/", "</"))
    assert data["name"] == "</script><b>x</b>" and data["total"] == 5
    # Self-contained: nothing to load from anywhere.
    assert "https://" not in text and "<script src" not in text

    missing = await campaign_process.run("report", "999999", config=cfg, dsn=dsn)
    assert missing.returncode == 2
    assert "campaign 999999: not found" in missing.log()
