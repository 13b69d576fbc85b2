"""What each recipient becomes after a classified answer (sender.plan_results)."""

import random
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import orjson
import pytest

from campaign import errors, payload, sms
from campaign.batch import Batch
from campaign.prepare import Claimed, normalise_all
from campaign.sender import Backoff, claim_columns, plan_results

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def batch(n: int = 3, *, attempts: int = 0, expires_at: datetime | None = None) -> Batch:
    return Batch(
        id=7,
        campaign_id=1,
        service="default",
        body=b"{}",
        recipient_ids=tuple(range(100, 100 + n)),
        correlation_ids=tuple(f"c{i}" for i in range(n)),
        attempts=(attempts,) * n,
        expires_at=expires_at,
    )


def plan(b: Batch, outcome: errors.Outcome, *, on_timeout: str = "resolve", max_attempts: int = 5):
    return plan_results(
        b,
        outcome,
        on_timeout=on_timeout,  # type: ignore[arg-type]
        max_attempts=max_attempts,
        retry_in_s=10.0,
        now=NOW,
    )


def result(code: str, cid: str | None, transid: str | None = None) -> errors.DestinationResult:
    return errors.DestinationResult(code, "desc", transid, cid)


def test_results_are_matched_by_correlation_id_not_position() -> None:
    outcome = errors.Outcome(
        "ok",
        "1001",
        "results",
        results=(
            result("7004", "c2", "t2"),
            result("1001", "zzz", "tz"),
            result("1001", "c0", "t0"),
            result("7020", "c1"),
        ),
    )
    p = plan(batch(4), outcome)
    assert p.batch_status == "done"
    assert p.ids == [100, 101, 102, 103]
    assert p.statuses == ["queued", "pending", "rejected", "unknown"]
    assert p.transids == ["t0", None, "t2", None]
    assert p.error_codes == [None, "7020", "7004", "no_result"]
    assert p.retry_in_s == [None, 10.0, None, None]
    assert p.attempts_added == [1, 1, 1, 1]


@pytest.mark.parametrize(
    ("on_timeout", "status", "retry_in_s"),
    [("resolve", "unknown", None), ("resend", "pending", 0.0), ("fail", "failed", None)],
)
def test_in_doubt_follows_on_timeout(
    on_timeout: str, status: str, retry_in_s: float | None
) -> None:
    p = plan(batch(2), errors.Outcome("in_doubt", "timeout", "t"), on_timeout=on_timeout)
    assert p.batch_status == "in_doubt"
    assert p.statuses == [status, status]
    assert p.retry_in_s == [retry_in_s, retry_in_s]
    assert p.error_codes == ["timeout", "timeout"]
    assert p.attempts_added == [1, 1]


def test_resend_stops_when_attempts_are_used_up() -> None:
    p = plan(batch(1, attempts=4), errors.Outcome("in_doubt", "timeout", "t"), on_timeout="resend")
    assert p.statuses == ["failed"]


def test_retry_backs_off_then_fails_after_max_attempts() -> None:
    p = plan(batch(2), errors.Outcome("retry", "7006", "internal"))
    assert (p.batch_status, p.statuses, p.retry_in_s) == ("retry", ["pending"] * 2, [10.0] * 2)
    p = plan(batch(2, attempts=4), errors.Outcome("retry", "7006", "internal"))
    assert p.statuses == ["failed", "failed"]
    assert p.error_codes == ["7006", "7006"]
    assert p.error_messages == ["internal", "internal"]


def test_a_retry_that_would_land_after_expiry_expires_instead() -> None:
    soon = batch(1, expires_at=NOW + timedelta(seconds=5))
    assert plan(soon, errors.Outcome("retry", "7020", "rate")).statuses == ["expired"]
    later = batch(1, expires_at=NOW + timedelta(seconds=60))
    assert plan(later, errors.Outcome("retry", "7020", "rate")).statuses == ["pending"]


def test_stop_service_leaves_recipients_pending_without_counting_an_attempt() -> None:
    p = plan(batch(2, attempts=4), errors.Outcome("stop_service", "7001", "auth"))
    assert p.batch_status == "released"
    assert p.statuses == ["pending", "pending"]
    assert p.attempts_added == [0, 0]
    assert p.retry_in_s == [None, None]


def test_rejected_request_rejects_every_recipient_with_the_code() -> None:
    p = plan(batch(2), errors.Outcome("rejected", "7108", "Invalid template"))
    assert p.batch_status == "done"
    assert p.statuses == ["rejected", "rejected"]
    assert p.error_codes == ["7108", "7108"]
    assert p.count("rejected") == 2


def test_backoff_is_capped_full_jitter() -> None:
    backoff = Backoff(base_s=2.0, max_s=30.0)
    rng = random.Random(1)
    for attempt, ceiling in [(1, 2.0), (2, 4.0), (4, 16.0), (5, 30.0), (20, 30.0)]:
        delays = [backoff.delay_s(attempt, rng) for _ in range(200)]
        assert all(0.0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling * 0.8  # jitter spreads over the whole range


def test_claim_columns_follow_the_plan_order() -> None:
    b = replace(
        batch(3),
        msisdn_e164=("+1", "+2", "+3"),
        encodings=("gsm7", "ucs2", None),
        parts=(1, 2, None),
    )
    assert claim_columns(b, [100, 101, 102]) == (
        ["+1", "+2", "+3"],
        ["gsm7", "ucs2", None],
        [1, 2, None],
    )
    assert claim_columns(b, [102, 100]) == (["+3", "+1"], [None, "gsm7"], [None, 1])
    # A batch without the claim's columns writes NULLs, which keep the stored values.
    assert claim_columns(batch(2), [100, 101]) == ([None, None], [None, None], [None, None])


def test_a_number_normalised_by_an_earlier_attempt_is_not_parsed_again() -> None:
    rows = [
        Claimed(1, "not a number", {}, "c1", 1, msisdn_e164="+919800000001"),
        Claimed(2, "not a number", {}, "c2", 0),
    ]
    first, second = normalise_all(rows, default_region="")
    assert first == "+919800000001"
    assert isinstance(second, sms.InvalidRecipient)


def test_a_batch_cut_to_fewer_recipients_carries_only_them() -> None:
    message = payload.MessageSettings(sender_id="S", priority=2)
    prepared = tuple(
        payload.Destination(correlation_id=f"c{i}", msisdn=f"91980000000{i}", text=f"Hi {i}")
        for i in range(4)
    )
    whole = replace(
        batch(4),
        body=payload.build_body(message, prepared),
        msisdn_e164=tuple(f"+91980000000{i}" for i in range(4)),
        encodings=("gsm7",) * 4,
        parts=(1,) * 4,
        message=message,
        prepared=prepared,
    )
    cut = whole.first(3)
    assert (cut.id, cut.campaign_id) == (whole.id, whole.campaign_id)
    assert cut.recipient_ids == whole.recipient_ids[:3]
    assert cut.correlation_ids == ("c0", "c1", "c2")
    assert cut.msisdn_e164 == whole.msisdn_e164[:3]
    assert cut.body == payload.build_body(message, prepared[:3])
    sent = [d["correlationid"] for m in orjson.loads(cut.body) for d in m["destination"]]
    assert sent == ["c0", "c1", "c2"]
    for count in (0, 4):
        with pytest.raises(ValueError):
            whole.first(count)
    with pytest.raises(ValueError):
        batch(4).first(2)  # no destinations to build a body from


def test_7005_expires_every_recipient_with_the_code() -> None:
    outcome = errors.Outcome("expired", "7005", "Request expired")
    p = plan(batch(2), outcome)
    assert p.batch_status == "done"
    assert p.statuses == ["expired", "expired"]
    assert p.error_codes == ["7005", "7005"]
    per_destination = errors.Outcome("ok", "1001", "results", results=(result("7005", "c0"),))
    assert plan(batch(1), per_destination).statuses == ["expired"]


def test_one_destination_takes_the_single_item_without_a_correlation_id() -> None:
    outcome = errors.Outcome("ok", "1001", "results", results=(result("1001", None, "t0"),))
    p = plan(batch(1), outcome)
    assert (p.statuses, p.transids, p.unmatched) == (["queued"], ["t0"], [])


def test_several_destinations_without_correlation_ids_stay_in_doubt_and_are_reported() -> None:
    items = (result("1001", None, "t0"), result("1001", None, "t1"))
    p = plan(batch(2), errors.Outcome("ok", "1001", "results", results=items))
    assert p.statuses == ["unknown", "unknown"]
    assert p.error_codes == ["no_result", "no_result"]
    assert p.unmatched == list(items)
    # A matched answer reports nothing.
    matched = plan(
        batch(1), errors.Outcome("ok", "1001", "results", results=(result("1001", "c0"),))
    )
    assert matched.unmatched == []
