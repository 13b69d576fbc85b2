"""The idle backoff of the roles' loops (campaign/aio.py)."""

from __future__ import annotations

from campaign.aio import IdleBackoff


def test_idle_passes_double_the_wait_up_to_the_cap_and_work_resets_it() -> None:
    backoff = IdleBackoff(base_s=1.0, max_s=10.0)
    waits = [backoff.after(worked=False) for _ in range(6)]
    assert waits == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert backoff.after(worked=True) == 1.0
    assert backoff.after(worked=False) == 1.0
    assert backoff.after(worked=False) == 2.0
    backoff.reset()
    assert backoff.after(worked=False) == 1.0


def test_a_cap_below_the_interval_means_no_backoff() -> None:
    backoff = IdleBackoff(base_s=5.0, max_s=0.0)
    assert [backoff.after(worked=False) for _ in range(3)] == [5.0, 5.0, 5.0]
