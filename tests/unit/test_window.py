"""The sending window in local time (campaign/window.py), with the clock passed in."""

from __future__ import annotations

from datetime import UTC, datetime, time

import phonenumbers
import pytest

from campaign import prepare, window
from campaign.window import Planner, Window, WindowError, next_opening, zones_of

DAY = Window.parse("09:00-21:00")
NIGHT = Window.parse("22:00-06:00")


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


def test_parse() -> None:
    assert Window(time(9), time(21)) == DAY
    assert Window.parse(" 9:30 - 17:00 ") == Window(time(9, 30), time(17))
    assert Window.parse("") is None
    assert str(DAY) == "09:00-21:00"
    for bad in ("09:00", "9-21", "09:00-24:00", "25:00-26:00", "09:00-09:00", "x"):
        with pytest.raises(WindowError):
            Window.parse(bad)


def test_contains_plain_and_wrapping() -> None:
    assert DAY is not None and NIGHT is not None
    assert DAY.contains(time(9)) and DAY.contains(time(20, 59))
    assert not DAY.contains(time(21)) and not DAY.contains(time(8, 59))
    assert NIGHT.contains(time(22)) and NIGHT.contains(time(0)) and NIGHT.contains(time(5, 59))
    assert not NIGHT.contains(time(6)) and not NIGHT.contains(time(12))


def test_zones_of_a_number() -> None:
    assert zones_of("+12025550123") == ("America/New_York",)
    assert zones_of("+919876543210") == ("Asia/Calcutta",)
    assert "Europe/London" in zones_of("+447911123456")
    # Several zones: a Russian mobile prefix, an Australian mobile, a US toll-free number.
    assert len(zones_of("+79161234567")) > 5
    assert {"Australia/Perth", "Australia/Sydney"} <= set(zones_of("+61412345678"))
    assert {"America/Los_Angeles", "America/New_York"} <= set(zones_of("+18005550123"))
    # No zone in the data: the service's default.
    assert zones_of("+447700900123", "Europe/Dublin") == ("Europe/Dublin",)
    assert zones_of("+447700900123") == ("UTC",)


def example_numbers() -> list[str]:
    """phonenumbers' example number of every type in every region: valid numbers of
    every country, geographic and not."""
    found = set()
    for region in phonenumbers.SUPPORTED_REGIONS:
        for kind in range(12):
            number = phonenumbers.example_number_for_type(region, kind)
            if number is not None and phonenumbers.is_valid_number(number):
                found.add(phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164))
    return sorted(found)


def test_the_country_shortcut_answers_as_phonenumbers_does_for_every_example_number() -> None:
    numbers = example_numbers()
    assert len(numbers) > 900
    shortcut = 0
    for e164 in numbers:
        slow = window._zones_of_parsed(e164, "Europe/Dublin")
        assert zones_of(e164, "Europe/Dublin") == slow, e164
        country = window._country_code(e164)
        assert country is not None and e164.startswith("+" + country)
        shortcut += window._country_zones(country) is not None
    # Most numbers take the shortcut; the test compares both paths for them.
    assert shortcut > len(numbers) // 2


def test_a_one_zone_country_is_answered_without_parsing_the_number(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_parse(*args: object) -> None:
        raise AssertionError("parsed")

    monkeypatch.setattr(window.phonenumbers, "parse", no_parse)
    assert zones_of("+919812345670") == ("Asia/Calcutta",)
    assert zones_of("+4915112345678") == ("Europe/Berlin",)
    # Countries whose zones depend on the number still parse it.
    with pytest.raises(AssertionError, match="parsed"):
        zones_of("+15550000042")


def test_three_countries_at_nine_utc() -> None:
    assert DAY is not None
    now = utc(2026, 6, 1, 9)
    assert next_opening(DAY, ("Asia/Calcutta",), now) == now  # 14:30 there
    assert next_opening(DAY, ("Europe/London",), now) == now  # 10:00 (summer time)
    # 02:00 in Los Angeles (UTC-7 in summer): opens at 09:00 local = 16:00 UTC.
    assert next_opening(DAY, ("America/Los_Angeles",), now) == utc(2026, 6, 1, 16)
    # After the window closed there: the next day's opening.
    assert next_opening(DAY, ("Europe/London",), utc(2026, 6, 1, 20)) == utc(2026, 6, 2, 8)


def test_wrapping_window() -> None:
    assert NIGHT is not None
    assert next_opening(NIGHT, ("UTC",), utc(2026, 6, 1, 12)) == utc(2026, 6, 1, 22)
    assert next_opening(NIGHT, ("UTC",), utc(2026, 6, 1, 23)) == utc(2026, 6, 1, 23)
    assert next_opening(NIGHT, ("UTC",), utc(2026, 6, 2, 5, 59)) == utc(2026, 6, 2, 5, 59)
    assert next_opening(NIGHT, ("UTC",), utc(2026, 6, 2, 6)) == utc(2026, 6, 2, 22)
    # In Kolkata (UTC+05:30) 22:00 is 16:30 UTC.
    assert next_opening(NIGHT, ("Asia/Calcutta",), utc(2026, 6, 1, 3)) == utc(2026, 6, 1, 16, 30)


def test_daylight_saving_days() -> None:
    assert DAY is not None
    ny = ("America/New_York",)
    # The day before spring forward: 09:00 EST is 14:00 UTC.
    assert next_opening(DAY, ny, utc(2026, 3, 7, 6)) == utc(2026, 3, 7, 14)
    # Spring forward (8 March 2026, 02:00 -> 03:00): 09:00 EDT is 13:00 UTC, not 14:00.
    assert next_opening(DAY, ny, utc(2026, 3, 8, 6)) == utc(2026, 3, 8, 13)
    # Fall back (1 November 2026): 09:00 EST is 14:00 UTC again.
    assert next_opening(DAY, ny, utc(2026, 11, 1, 6)) == utc(2026, 11, 1, 14)
    # Closing follows the clock too: 20:30 EDT on spring-forward day is still open.
    assert next_opening(DAY, ny, utc(2026, 3, 9, 0, 30)) == utc(2026, 3, 9, 0, 30)
    # London's change (29 March 2026, 01:00 UTC): 09:00 BST is 08:00 UTC.
    assert next_opening(DAY, ("Europe/London",), utc(2026, 3, 29, 0)) == utc(2026, 3, 29, 8)
    # A window that opens inside the spring-forward gap opens when the gap ends.
    gap = Window.parse("02:30-05:00")
    assert gap is not None
    assert next_opening(gap, ny, utc(2026, 3, 8, 5)) == utc(2026, 3, 8, 7)


def test_several_zones_wait_for_the_intersection() -> None:
    assert DAY is not None
    zones = ("America/New_York", "America/Los_Angeles")
    # 13:00 UTC: 09:00 in New York, 06:00 in Los Angeles: shut until LA opens at 16:00 UTC.
    assert next_opening(DAY, zones, utc(2026, 6, 1, 13)) == utc(2026, 6, 1, 16)
    # 00:30 UTC: New York closed at 21:00 EDT (01:00 UTC is still 21:00, so 00:30 is open in
    # both): open.
    assert next_opening(DAY, zones, utc(2026, 6, 1, 0, 30)) == utc(2026, 6, 1, 0, 30)
    # 01:00 UTC: closed in New York (21:00) though open in LA: next opening is LA's 09:00
    # (16:00 UTC), when New York is open too.
    assert next_opening(DAY, zones, utc(2026, 6, 1, 1)) == utc(2026, 6, 1, 16)
    # A Russian mobile number spans Kaliningrad-ish to Kamchatka: the window is open in
    # all of them only between 06:00 and 08:00 UTC in summer (09:00 in Bucharest to 21:00
    # in Anadyr).
    russia = zones_of("+79161234567")
    assert next_opening(DAY, russia, utc(2026, 6, 1, 12)) == utc(2026, 6, 2, 6)
    assert next_opening(DAY, russia, utc(2026, 6, 2, 7)) == utc(2026, 6, 2, 7)


def test_zones_that_never_overlap() -> None:
    short = Window.parse("09:00-10:00")
    assert short is not None
    assert next_opening(short, ("Asia/Tokyo", "America/New_York"), utc(2026, 6, 1)) is None


def test_planner_caches_per_zone_set() -> None:
    assert DAY is not None
    now = utc(2026, 6, 1, 9)
    planner = Planner(DAY, default_timezone="UTC", now=now)
    india = planner.decide("+919876543210")
    la = planner.decide("+13105550123")
    assert india.is_open(now) and india.zones == ("Asia/Calcutta",)
    assert not la.is_open(now) and la.opens_at == utc(2026, 6, 1, 16)
    assert planner.decide("+13105550199").opens_at == la.opens_at
    assert window.zone("UTC") is window.zone("UTC")


def _campaign(expires_at: datetime | None = None) -> prepare.Campaign:
    return prepare.Campaign(
        id=1,
        service="s",
        sender_id="S",
        body="Hi",
        template_id=None,
        smartlinks={},
        priority=2,
        expires_at=expires_at,
        callback_data=None,
        send_window=DAY,
    )


def test_prepare_holds_rows_outside_their_window() -> None:
    assert DAY is not None
    now = utc(2026, 6, 1, 9)
    numbers = ["+919876543210", "+13105550123", "+18005550123", "+447911123456"]
    rows = [
        prepare.Claimed(id=i, msisdn=n, variables={}, correlation_id=f"r{i}", attempts=2)
        for i, n in enumerate(numbers)
    ]

    def decide(campaign: prepare.Campaign) -> list[prepare.Prepared]:
        planner = Planner(DAY, default_timezone="UTC", now=now)
        return prepare.prepare(
            campaign, rows, numbers, suppressed={"+447911123456"}, plus_prefix=False,
            planner=planner,
        )  # fmt: skip

    india, la, toll_free, opted_out = decide(_campaign())
    assert india.status == "sending" and india.destination is not None
    assert (la.status, la.next_attempt_at, la.error_code) == (
        "pending",
        utc(2026, 6, 1, 16),
        "outside_window",
    )
    assert la.destination is None and "America/Los_Angeles" in (la.error_message or "")
    # +1 800 may be anywhere from Guam to Halifax: open in all of them only at 23:00 UTC.
    assert (toll_free.status, toll_free.next_attempt_at) == ("pending", utc(2026, 6, 1, 23))
    # A suppressed number is settled whatever its window.
    assert opted_out.status == "suppressed"

    _, la, toll_free, _ = decide(_campaign(expires_at=utc(2026, 6, 1, 20)))
    assert (la.status, la.error_code) == ("pending", "outside_window")
    assert (toll_free.status, toll_free.error_code) == ("expired", "window_after_expiry")
    assert toll_free.next_attempt_at is None

    # Without a planner (no window) every valid row is sent.
    plain = prepare.prepare(_campaign(), rows, numbers, suppressed=set(), plus_prefix=False)
    assert [p.status for p in plain] == ["sending"] * 4
