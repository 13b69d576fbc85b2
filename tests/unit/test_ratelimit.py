import asyncio

import pytest
from structlog.testing import capture_logs

from campaign.ratelimit import ServiceLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limiter(rate: float = 100.0, batch: int = 1000, **kw: object) -> tuple[ServiceLimiter, Clock]:
    clock = Clock()
    return ServiceLimiter(
        service="s",
        rate_per_s=rate,
        batch_size=batch,
        clock=clock,
        **kw,  # type: ignore[arg-type]
    ), clock


def test_batch_is_clamped_to_the_rate_and_to_batch_size() -> None:
    assert limiter(rate=100.0, batch=1000)[0].max_batch == 100
    assert limiter(rate=5000.0, batch=1000)[0].max_batch == 1000
    assert limiter(rate=0.5, batch=10)[0].max_batch == 1
    with pytest.raises(ValueError):
        ServiceLimiter(service="s", rate_per_s=0, batch_size=1)


def test_repeated_7020_halves_the_rate_once_per_cooldown_and_logs_it() -> None:
    lim, clock = limiter(rate=200.0, batch=200)
    with capture_logs() as logs:
        lim.record_rate_limited()
        assert lim.effective_rate_per_s == 200.0  # one 7020 alone is not a trend
        lim.record_rate_limited()
        assert lim.effective_rate_per_s == 100.0
        assert lim.max_batch == 100
        lim.record_rate_limited()
        lim.record_rate_limited()
        assert lim.effective_rate_per_s == 100.0  # within the cooldown
        clock.now += 1.5
        lim.record_rate_limited()
        lim.record_rate_limited()
        assert lim.effective_rate_per_s == 50.0
    decreases = [e for e in logs if e["event"] == "rate_decreased"]
    assert [(e["previous_rate_per_s"], e["rate_per_s"]) for e in decreases] == [
        (200.0, 100.0),
        (100.0, 50.0),
    ]
    assert all(e["service"] == "s" and e["log_level"] == "warning" for e in decreases)


def test_a_success_between_7020s_resets_the_count() -> None:
    lim, _ = limiter()
    lim.record_rate_limited()
    lim.record_success()
    lim.record_rate_limited()
    assert lim.effective_rate_per_s == 100.0


def test_the_rate_has_a_floor() -> None:
    lim, clock = limiter(rate=100.0, batch=100)
    for _ in range(20):
        clock.now += 2
        lim.record_rate_limited()
        lim.record_rate_limited()
    assert lim.effective_rate_per_s == pytest.approx(5.0)
    assert lim.max_batch == 5


def test_the_rate_climbs_back_slowly_to_the_configured_one() -> None:
    lim, clock = limiter(rate=100.0, batch=100)
    lim.record_rate_limited()
    lim.record_rate_limited()
    assert lim.effective_rate_per_s == 50.0
    with capture_logs() as logs:
        lim.record_success()
        assert lim.effective_rate_per_s == 50.0  # too soon after the decrease
        clock.now += 5
        lim.record_success()
        assert lim.effective_rate_per_s == pytest.approx(55.0)
        lim.record_success()
        assert lim.effective_rate_per_s == pytest.approx(55.0)
        for _ in range(20):
            clock.now += 5
            lim.record_success()
    assert lim.effective_rate_per_s == 100.0
    increases = [e for e in logs if e["event"] == "rate_increased"]
    assert len(increases) == 10
    assert increases[0]["previous_rate_per_s"] == 50.0
    assert increases[-1]["rate_per_s"] == 100.0


async def test_acquire_holds_the_rate_beyond_one_bucket() -> None:
    lim = ServiceLimiter(service="s", rate_per_s=1000.0, batch_size=100)
    loop = asyncio.get_running_loop()
    started = loop.time()
    for _ in range(5):
        await lim.acquire(100)
    # The first 100 may go at once; the other 400 need 0.4 s at 1000/s.
    assert loop.time() - started >= 0.35


async def test_acquire_grants_at_most_one_current_batch() -> None:
    lim = ServiceLimiter(service="s", rate_per_s=2000.0, batch_size=100)
    assert await lim.acquire(300) == 100
    assert await lim.acquire(30) == 30
    # A batch claimed at the full rate, paid for after a worker joined: half of it now.
    lim.set_share(0.5)
    assert await lim.acquire(100) == 50
    lim.adopt_factor(0.5)
    assert await lim.acquire(100) == 25
    with pytest.raises(ValueError):
        await lim.acquire(0)


async def test_a_wait_priced_again_grants_the_new_batch_size() -> None:
    lim = ServiceLimiter(service="s", rate_per_s=100.0, batch_size=100)
    assert await lim.acquire(100) == 100  # the bucket is full
    waiting = asyncio.create_task(lim.acquire(100))
    await asyncio.sleep(0.05)
    lim.set_share(0.25)
    assert await asyncio.wait_for(waiting, timeout=5.0) == 25


async def test_a_lowered_rate_charges_more_per_destination() -> None:
    lim = ServiceLimiter(service="s", rate_per_s=1000.0, batch_size=100)
    lim.record_rate_limited()
    lim.record_rate_limited()
    assert lim.effective_rate_per_s == 500.0
    loop = asyncio.get_running_loop()
    started = loop.time()
    for _ in range(3):
        await lim.acquire(50)
    # 150 destinations at 500/s with one 50-destination burst: at least 0.2 s.
    assert loop.time() - started >= 0.18
