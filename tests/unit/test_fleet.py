"""Share arithmetic of a fleet: each worker's part of a service's rate, batches clamped to
it, the bucket surviving a change of share, the fleet factor adopted, [retention] checks."""

import asyncio

import pytest

from campaign import config
from campaign.fleet import proposal, share_of
from campaign.ratelimit import ServiceLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_live_workers_share_the_rate_equally() -> None:
    assert share_of(rate_per_s=3000.0, min_rate_per_s=3000.0, live_workers=1) == 1.0
    assert share_of(rate_per_s=3000.0, min_rate_per_s=3000.0, live_workers=3) == pytest.approx(
        1 / 3
    )
    assert share_of(rate_per_s=3000.0, min_rate_per_s=3000.0, live_workers=2) == 0.5


def test_the_smallest_configured_rate_is_the_one_shared() -> None:
    # This worker says 3000/s, another 1500/s: the fleet holds 1500/s, 750 each.
    mine = share_of(rate_per_s=3000.0, min_rate_per_s=1500.0, live_workers=2)
    assert mine * 3000.0 == pytest.approx(750.0)
    theirs = share_of(rate_per_s=1500.0, min_rate_per_s=1500.0, live_workers=2)
    assert theirs * 1500.0 == pytest.approx(750.0)
    with pytest.raises(ValueError):
        share_of(rate_per_s=3000.0, min_rate_per_s=3000.0, live_workers=0)


def test_a_share_scales_the_rate_and_the_batch() -> None:
    lim = ServiceLimiter(service="s", rate_per_s=3000.0, batch_size=1000)
    assert (lim.max_batch, lim.effective_rate_per_s) == (1000, 3000.0)
    lim.set_share(share_of(rate_per_s=3000.0, min_rate_per_s=3000.0, live_workers=3))
    assert lim.effective_rate_per_s == pytest.approx(1000.0)
    assert lim.max_batch == 333
    lim.set_share(0.5)
    assert lim.max_batch == 500
    with pytest.raises(ValueError):
        lim.set_share(0.0)
    with pytest.raises(ValueError):
        lim.set_share(1.5)


@pytest.mark.parametrize(("rate", "batch"), [(3000.0, 1000), (100.0, 1000), (2500.0, 700)])
@pytest.mark.parametrize("workers", [1, 2, 3, 4, 7, 10])
def test_a_fleets_batches_add_up_to_at_most_one_batch(
    rate: float, batch: int, workers: int
) -> None:
    """Each request is one bucket's worth of its worker's tokens, so the fleet's excess over
    the rate in any window is at most the sum of one batch per worker: one configured batch."""
    limiters = [
        ServiceLimiter(service="s", rate_per_s=rate, batch_size=batch) for _ in range(workers)
    ]
    for lim in limiters:
        lim.set_share(share_of(rate_per_s=rate, min_rate_per_s=rate, live_workers=workers))
    assert sum(lim.max_batch for lim in limiters) <= min(batch, rate)
    assert all(lim.max_batch <= lim.effective_rate_per_s + 1e-9 for lim in limiters)
    assert sum(lim.effective_rate_per_s for lim in limiters) == pytest.approx(rate)


def test_the_batch_follows_the_factor_and_the_share_together() -> None:
    lim = ServiceLimiter(service="s", rate_per_s=3000.0, batch_size=1000)
    lim.set_share(0.5)
    lim.record_rate_limited()
    lim.record_rate_limited()
    assert lim.factor == 0.5
    assert lim.effective_rate_per_s == pytest.approx(750.0)
    assert lim.max_batch == 250


def test_adopting_the_fleet_factor_clamps_and_restarts_the_increase_interval() -> None:
    clock = Clock()
    lim = ServiceLimiter(service="s", rate_per_s=100.0, batch_size=100, clock=clock)
    lim.adopt_factor(0.5)
    assert lim.effective_rate_per_s == 50.0
    lim.record_success()
    assert lim.factor == 0.5  # adopted just now: no step up yet
    clock.now += 5
    lim.record_success()
    assert lim.factor == pytest.approx(0.55)
    lim.adopt_factor(0.0001)
    assert lim.factor == pytest.approx(0.05)  # the floor
    lim.adopt_factor(3.0)
    assert lim.factor == 1.0


async def test_a_share_of_one_half_halves_the_rate() -> None:
    lim = ServiceLimiter(service="s", rate_per_s=1000.0, batch_size=100)
    lim.set_share(0.5)
    loop = asyncio.get_running_loop()
    started = loop.time()
    for _ in range(3):
        await lim.acquire(lim.max_batch)
    # 150 destinations at 500/s, the first 50 at once: at least 0.2 s.
    assert lim.max_batch == 50
    assert loop.time() - started >= 0.18


async def test_changing_the_share_keeps_the_bucket() -> None:
    lim = ServiceLimiter(service="s", rate_per_s=1000.0, batch_size=100)
    lim.set_share(0.5)
    await lim.acquire(50)  # fills the whole bucket (100 tokens)
    lim.set_share(1.0)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await lim.acquire(100)
    # Had the bucket been replaced, 100 would have gone at once.
    assert loop.time() - started >= 0.08


def test_a_worker_offers_its_factor_only_when_its_limiter_moved_it() -> None:
    assert proposal(local=1.0, adopted=None) == 1.0  # first heartbeat: a fresh worker's 1.0
    assert proposal(local=0.5, adopted=0.5) is None  # following the fleet: no opinion
    assert proposal(local=0.25, adopted=0.5) == 0.25  # 7020s here: lower the fleet's
    assert proposal(local=0.55, adopted=0.5) == 0.55  # successes here: offer a step up


async def test_a_wait_is_priced_again_when_the_share_rises() -> None:
    lim = ServiceLimiter(service="s", rate_per_s=100.0, batch_size=100)
    lim.set_share(0.5)
    await lim.acquire(50)  # 100 tokens: the bucket is full
    loop = asyncio.get_running_loop()
    started = loop.time()
    waiting = asyncio.create_task(lim.acquire(50))  # 100 tokens more: 1 s at the old price
    await asyncio.sleep(0.05)
    lim.set_share(1.0)  # now 50 tokens: due after 0.5 s
    await asyncio.wait_for(waiting, timeout=5.0)
    assert loop.time() - started < 0.85


async def test_a_wait_is_priced_again_when_the_share_falls() -> None:
    lim = ServiceLimiter(service="s", rate_per_s=100.0, batch_size=100)
    await lim.acquire(100)  # the bucket is full
    loop = asyncio.get_running_loop()
    started = loop.time()
    waiting = asyncio.create_task(lim.acquire(50))  # 50 tokens: 0.5 s at the old price
    await asyncio.sleep(0.05)
    lim.set_share(0.5)  # now 100 tokens: the whole bucket must drain, 1 s
    await asyncio.wait_for(waiting, timeout=5.0)
    assert loop.time() - started >= 0.9


def test_retention_days_must_not_be_negative() -> None:
    settings = config.parse({"retention": {"reports_days": 7, "campaigns_days": 0}})
    assert settings.retention.reports_days == 7
    assert settings.retention.campaigns_days == 0
    with pytest.raises(config.ConfigError, match=r"\[retention\] batches_days: must not be"):
        config.parse({"retention": {"batches_days": -1}})
    with pytest.raises(config.ConfigError, match=r"\[retention\] batch_size: must be greater"):
        config.parse({"retention": {"batch_size": 0}})
