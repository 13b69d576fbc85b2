"""The status vocabulary and the recipient state machine: the one place they are spelled.

A recipient moves through these statuses, each move made by one role in one named query
(sql/queries). The SQL CHECK constraints hold the same vocabulary; tests/unit/test_statuses.py
checks both the constraints and every UPDATE of campaign.recipients against this module,
so a new status or move is added here first.

    pending --producer--> sending --sender--> queued --reconciler--> delivered / failed / expired
       ^                     |  \\               |
       |                     |   +--sender--> rejected / failed / expired (final)
       |                     |   +--sender--> unknown (in doubt) --recovery--> pending / failed
       |                     +--producer--> invalid / suppressed / duplicate / capped (final)
       +--producer-- (outside its sending window: waits for the opening, or expired)
       +--sender / recovery-- (retry, a batch given back)
    pending --producer--> cancelled / expired (sweeps of cancelled and expired campaigns)
    queued / unknown --reconciler--> pending (a transient failure report, sent once more)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, Literal, cast, get_args

RecipientStatus = Literal[
    "pending",
    "sending",
    "queued",
    "unknown",
    "delivered",
    "failed",
    "rejected",
    "invalid",
    "suppressed",
    "duplicate",
    "capped",
    "expired",
    "cancelled",
]
CampaignStatus = Literal["draft", "ready", "running", "paused", "cancelled", "completed"]
BatchStatus = Literal["claimed", "posting", "done", "retry", "in_doubt", "released", "abandoned"]

# In the order people read them: work left, in flight, then the outcomes.
RECIPIENT_STATUSES: Final[tuple[RecipientStatus, ...]] = get_args(RecipientStatus)
CAMPAIGN_STATUSES: Final[tuple[CampaignStatus, ...]] = get_args(CampaignStatus)
BATCH_STATUSES: Final[tuple[BatchStatus, ...]] = get_args(BatchStatus)

# Nothing more will be sent: a delivery report may still replace one final outcome with
# another (a late delivered after a report timeout's failed), never send it again.
FINAL: Final[tuple[RecipientStatus, ...]] = (
    "delivered",
    "failed",
    "expired",
    "rejected",
    "invalid",
    "suppressed",
    "duplicate",
    "capped",
    "cancelled",
)
# Final statuses the producer gives before any request: the recipient was never sent.
NOT_SENT: Final[tuple[RecipientStatus, ...]] = ("invalid", "suppressed", "duplicate", "capped")
# Final statuses of recipients no message went out to: stopped before any request
# (NOT_SENT), refused by the API (rejected), expired or cancelled before being sent.
# `expired` also covers the rare report 7208 (expired in the network after acceptance).
NEVER_SENT: Final[tuple[RecipientStatus, ...]] = (*NOT_SENT, "rejected", "expired", "cancelled")
# At least this share of recipients not sent is worth a warning: invalid ones in a batch
# (producer) or a campaign (`campaign status`), never sent ones in a completed campaign
# (reconciler).
MOSTLY_INVALID: Final = 0.5
# Not yet accepted by the API: these rows may still cost a request.
UNSENT: Final[tuple[RecipientStatus, ...]] = ("pending", "sending", "unknown")
# Accepted by the API (queued) or possibly accepted (sending, unknown): a delivery report
# may still arrive for them.
IN_FLIGHT: Final[tuple[RecipientStatus, ...]] = ("sending", "queued", "unknown")
# A campaign is complete when none of its recipients is in one of these.
OPEN: Final[tuple[RecipientStatus, ...]] = ("pending", "sending", "queued", "unknown")
# Statuses in which the API took the message (for rates and summaries).
ACCEPTED: Final[tuple[RecipientStatus, ...]] = ("delivered", "failed", "expired", "queued")

Role = Literal["producer", "sender", "recovery", "reconciler"]


@dataclass(frozen=True, slots=True)
class Move:
    """One named query's moves: any status in `sources` to any in `targets`, by `role`."""

    role: Role
    query: str
    sources: frozenset[RecipientStatus]
    targets: frozenset[RecipientStatus]


def _move(role: Role, query: str, sources: Iterable[str], targets: Iterable[str]) -> Move:
    """A move, its statuses checked against the vocabulary when this module is imported."""
    unknown = {*sources, *targets} - set(RECIPIENT_STATUSES)
    if unknown:
        raise ValueError(f"{query}: not recipient statuses: {sorted(unknown)}")
    return Move(
        role,
        query,
        frozenset(cast(Iterable[RecipientStatus], sources)),
        frozenset(cast(Iterable[RecipientStatus], targets)),
    )


_NOT_SENDING = set(RECIPIENT_STATUSES) - {"sending"}

# Every UPDATE of campaign.recipients' status, by query name.
TRANSITIONS: Final[tuple[Move, ...]] = (
    _move("producer", "producer_claim_batch", {"pending"}, {"sending"}),
    # The rows a batch does not send: final (invalid, suppressed, duplicate, capped), or
    # outside the recipient's sending window: back to pending until it opens (attempts
    # unchanged), or expired when it opens only after the campaign's expires_at.
    _move(
        "producer",
        "producer_prepare_recipients",
        {"sending"},
        {"invalid", "suppressed", "duplicate", "capped", "pending", "expired"},
    ),
    _move("producer", "producer_cancel_pending", {"pending"}, {"cancelled"}),
    _move("producer", "producer_expire_pending", {"pending"}, {"expired"}),
    # The submit response, per destination; `unknown` rows of the batch can still take
    # their late result. `pending` is a retry (attempts and backoff in the row).
    _move(
        "sender",
        "sender_write_results",
        {"sending", "unknown"},
        {"queued", "pending", "unknown", "rejected", "failed", "expired"},
    ),
    _move("sender", "sender_release_batch", {"sending"}, {"pending"}),
    # A batch whose campaign was paused, cancelled or expired since its claim is given
    # back at the last moment before its POST.
    _move("sender", "sender_mark_posting", {"sending"}, {"pending"}),
    # A batch whose worker died or stopped: never posted -> pending, maybe posted -> unknown.
    _move("recovery", "recovery_expired_batches", {"sending"}, {"pending", "unknown"}),
    _move("recovery", "recovery_release_worker", {"sending"}, {"pending", "unknown"}),
    # In doubt past the grace period with no report: send again, or give up.
    _move("recovery", "recovery_resolve_unknown", {"unknown"}, {"pending", "failed"}),
    # A delivery report settles any row the sender is done with, even one in doubt or
    # already final (a later final report wins); an interim one only marks it queued.
    # Found by correlation id alone it settles only a row some request may have carried
    # (`unknown`, or attempts > 0: a `pending` row never posted is not a source), and a
    # report of a superseded attempt (another transid than the row's) moves nothing.
    # A transient failure ([policy] retry_codes) of a row not final yet sends it once
    # more: back to `pending`, never from a final status.
    _move(
        "reconciler",
        "reconcile_match_reports",
        _NOT_SENDING,
        {"queued", "delivered", "failed", "expired", "pending"},
    ),
    _move("reconciler", "reconcile_report_timeout", {"queued"}, {"failed"}),
)


def moves_by(role: Role) -> tuple[Move, ...]:
    return tuple(m for m in TRANSITIONS if m.role == role)


def allowed(role: Role, source: RecipientStatus, target: RecipientStatus) -> bool:
    """Whether `role` may move a recipient from `source` to `target`."""
    return any(source in m.sources and target in m.targets for m in moves_by(role))
