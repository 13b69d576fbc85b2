"""Per-recipient preparation, pure: what the producer decides for each claimed row.

Normalise the number, drop opted-out numbers, render the text and check it, then the
guards: a number's second row in a campaign is a `duplicate`, a number over the frequency
cap is `capped`. Every row becomes either a destination still `sending` (with its number,
encoding and parts) or a final status with a reason. No I/O here: the producer reads what
these functions need (suppressed numbers, numbers already sent, counts in the cap window)
and writes what they decide; `campaign check` runs the same functions without writing.
A row outside its local-time sending window waits (or expires) before the guards see it.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from campaign import payload, sms, window
from campaign.statuses import RecipientStatus


class Row(Protocol):
    """A database row as the claim returns it (an asyncpg Record), read by column name."""

    def __getitem__(self, key: str, /) -> Any: ...


@dataclass(frozen=True, slots=True)
class Campaign:
    id: int
    service: str
    sender_id: str
    body: str | None
    template_id: str | None
    smartlinks: Mapping[str, Mapping[str, Any]]
    priority: int
    expires_at: datetime | None
    callback_data: str | None
    # Local hours its recipients may be sent in: its own columns, else the service's.
    send_window: window.Window | None = None
    allow_duplicates: bool = False
    bypass_caps: bool = False

    @classmethod
    def from_record(
        cls, row: Row, *, default_sender_id: str, default_window: window.Window | None = None
    ) -> Campaign:
        start, end = row["window_start"], row["window_end"]
        return cls(
            id=row["id"],
            service=row["service"],
            sender_id=row["sender_id"] or default_sender_id,
            body=row["body"],
            template_id=row["template_id"],
            smartlinks=payload.parse_smartlinks(row["smartlinks"]),
            priority=row["priority"],
            expires_at=row["expires_at"],
            callback_data=row["callback_data"],
            send_window=window.Window(start, end) if start is not None else default_window,
            allow_duplicates=row["allow_duplicates"],
            bypass_caps=row["bypass_caps"],
        )


# Per recipient, a thousand per batch: not frozen, whose __init__ is slower (performance.md).
@dataclass(slots=True)
class Claimed:
    id: int
    msisdn: str
    variables: Mapping[str, Any]
    correlation_id: str
    attempts: int
    # Set by an earlier attempt's results: the number was already normalised.
    msisdn_e164: str | None = None
    # Another batch's row, prepared here only to learn whether it owns its number.
    foreign: bool = False


# Per recipient, a thousand per batch: not frozen, whose __init__ is slower (performance.md).
@dataclass(slots=True)
class Prepared:
    """A claimed row after the checks: still 'sending' with a destination, or final."""

    id: int
    status: RecipientStatus
    msisdn_e164: str | None = None
    encoding: str | None = None
    parts: int | None = None
    error_code: str | None = None
    error_message: str | None = None
    destination: payload.Destination | None = None
    attempts: int = 0
    # Outside its sending window: when it opens (the row goes back to pending till then).
    next_attempt_at: datetime | None = None


# Error codes of rows the sending window held back (producer_prepare_recipients).
OUTSIDE_WINDOW = "outside_window"
WINDOW_AFTER_EXPIRY = "window_after_expiry"
WINDOW_NEVER_OPEN = "window_never_open"
WINDOW_CODES = frozenset({OUTSIDE_WINDOW, WINDOW_AFTER_EXPIRY, WINDOW_NEVER_OPEN})


def held_by_window(
    campaign: Campaign, number: str, row_id: int, planner: window.Planner
) -> Prepared | None:
    """The row's fate when its window is shut now: wait for the opening, or expire."""
    decision = planner.decide(number)
    if decision.is_open(planner.now):
        return None
    zones = ", ".join(decision.zones)
    where = f"local {planner.window} in {zones}"
    if decision.opens_at is None:
        return Prepared(
            id=row_id,
            status="expired",
            msisdn_e164=number,
            error_code=WINDOW_NEVER_OPEN,
            error_message=f"sending window {where} is never open in all of them at once",
        )
    opens = f"{decision.opens_at:%Y-%m-%d %H:%M}Z"
    if campaign.expires_at is not None and decision.opens_at >= campaign.expires_at:
        return Prepared(
            id=row_id,
            status="expired",
            msisdn_e164=number,
            error_code=WINDOW_AFTER_EXPIRY,
            error_message=f"sending window ({where}) opens at {opens}, after the campaign expires",
        )
    return Prepared(
        id=row_id,
        status="pending",
        msisdn_e164=number,
        error_code=OUTSIDE_WINDOW,
        error_message=f"outside the sending window ({where}); opens at {opens}",
        next_attempt_at=decision.opens_at,
    )


def normalise_all(
    rows: Sequence[Claimed], *, default_region: str
) -> list[str | sms.InvalidRecipient]:
    """Each row's E.164 number, or why it has none."""
    numbers: list[str | sms.InvalidRecipient] = []
    for row in rows:
        if row.msisdn_e164 is not None:
            # A retry: phonenumbers already accepted this number; checking it again costs.
            numbers.append(row.msisdn_e164)
            continue
        try:
            numbers.append(sms.normalise_msisdn(row.msisdn, default_region=default_region))
        except sms.InvalidRecipient as exc:
            numbers.append(exc)
    return numbers


@dataclass(slots=True)
class Guards:
    """What the duplicate and frequency-cap steps know, updated as `prepare` decides rows.

    The caller reads the inputs for the rows at hand (under the locks that make them
    exact, in the producer) and stores what the pass added: `registered` (a number's
    first row in the campaign, the one sent) and `reserved` (a place under the cap).
    `campaign check` keeps one across all of a campaign's rows, so a number's second row
    in a later page is still a duplicate and the counts grow as they would when sending.
    """

    # Number -> the recipient of this campaign that is sent to it.
    owners: dict[str, int] = field(default_factory=dict)
    allow_duplicates: bool = False
    # 0: no cap (none configured, or the campaign bypasses it).
    max_per_msisdn: int = 0
    window_h: float = 24.0
    # Number -> messages counted in the window, across campaigns.
    in_window: dict[str, int] = field(default_factory=dict)
    # Recipients holding a reservation already (a retry): counted once, not stopped.
    held: Collection[int] = frozenset()
    registered: list[tuple[str, int]] = field(default_factory=list)
    reserved: list[tuple[int, str]] = field(default_factory=list)

    def decide(self, row: Claimed, number: str) -> Prepared | None:
        """The row's final status if a guard stops it; None when it is to be sent."""
        if not self.allow_duplicates:
            owner = self.owners.get(number)
            if owner is None:
                self.owners[number] = row.id
                self.registered.append((number, row.id))
            elif owner != row.id:
                return Prepared(
                    id=row.id,
                    status="duplicate",
                    msisdn_e164=number,
                    error_code="duplicate",
                    error_message=f"same number as recipient {owner}, which is the one sent",
                )
        # A row another batch will send is only registered here; its own batch counts it.
        if self.max_per_msisdn <= 0 or row.foreign or row.id in self.held:
            return None
        sent = self.in_window.get(number, 0)
        if sent >= self.max_per_msisdn:
            return Prepared(
                id=row.id,
                status="capped",
                msisdn_e164=number,
                error_code="capped",
                error_message=(
                    f"{sent} messages sent to this number in the last {self.window_h:g} h"
                    f" ([policy] max_per_msisdn = {self.max_per_msisdn})"
                ),
            )
        self.in_window[number] = sent + 1
        self.reserved.append((row.id, number))
        return None


def prepare(
    campaign: Campaign,
    rows: Sequence[Claimed],
    numbers: Sequence[str | sms.InvalidRecipient],
    *,
    suppressed: Collection[str],
    plus_prefix: bool,
    planner: window.Planner | None = None,
    smartlink_length: int = 0,
    guards: Guards | None = None,
) -> list[Prepared]:
    """Decide every row, in id order: invalid, suppressed, outside its sending window (with
    `planner`, the campaign's window at this instant: it waits or expires), duplicate,
    capped, or a destination with its text. Without `guards` no duplicate or cap rule
    applies."""
    prepared: list[Prepared] = []
    for row, number in zip(rows, numbers, strict=True):
        if isinstance(number, sms.InvalidRecipient):
            prepared.append(
                Prepared(
                    id=row.id,
                    status="invalid",
                    error_code=number.code,
                    error_message=number.message,
                )
            )
            continue
        if number in suppressed:
            prepared.append(
                Prepared(
                    id=row.id,
                    status="suppressed",
                    msisdn_e164=number,
                    error_code="suppressed",
                    error_message="number opted out",
                )
            )
            continue
        rendered: sms.Rendered | None = None
        if campaign.body is not None:
            try:
                rendered = sms.render(
                    campaign.body, row.variables, smartlink_length=smartlink_length
                )
                payload.check_links(rendered.link_ids, campaign.smartlinks)
            except sms.InvalidRecipient as exc:
                prepared.append(
                    Prepared(
                        id=row.id,
                        status="invalid",
                        msisdn_e164=number,
                        error_code=exc.code,
                        error_message=exc.message,
                    )
                )
                continue
        if planner is not None:
            held = held_by_window(campaign, number, row.id, planner)
            if held is not None:
                # It does not own its number nor take a place under the cap while it waits.
                prepared.append(held)
                continue
        if guards is not None:
            stopped = guards.decide(row, number)
            if stopped is not None:
                prepared.append(stopped)
                continue
        msisdn = sms.api_msisdn(number, plus_prefix=plus_prefix)
        if rendered is None:
            # A template campaign: the platform holds the text, so there is nothing to count.
            destination = payload.Destination(correlation_id=row.correlation_id, msisdn=msisdn)
            prepared.append(
                Prepared(
                    id=row.id,
                    status="sending",
                    msisdn_e164=number,
                    destination=destination,
                    attempts=row.attempts,
                )
            )
            continue
        destination = payload.Destination(
            correlation_id=row.correlation_id,
            msisdn=msisdn,
            text=rendered.text,
            ucs2=rendered.encoding == "ucs2",
            link_ids=rendered.link_ids,
        )
        prepared.append(
            Prepared(
                id=row.id,
                status="sending",
                msisdn_e164=number,
                encoding=rendered.encoding,
                parts=rendered.parts,
                destination=destination,
                attempts=row.attempts,
            )
        )
    return prepared
