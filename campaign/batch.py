"""The contract between the producer and the senders: a claimed `Batch` on a service's `Lane`.

The producer puts a batch on a lane's bounded queue only once every recipient in it was
checked and rendered and the request body encoded; a sender takes it from there. A lane is
one service's shared state: its limiter, its queue, the batches held in this worker (their
leases are renewed while they wait), and whether the service was stopped.
"""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass
from datetime import datetime

import structlog

from campaign import payload
from campaign.config import ServiceSettings
from campaign.ratelimit import ServiceLimiter

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Batch:
    """One claimed request's worth of recipients: the item on a lane's queue."""

    id: int
    campaign_id: int
    service: str
    body: bytes
    recipient_ids: tuple[int, ...]
    correlation_ids: tuple[str, ...]
    # Attempts already made per recipient (same order as recipient_ids).
    attempts: tuple[int, ...]
    expires_at: datetime | None = None
    # What the claim found per recipient (same order), stored with the results.
    msisdn_e164: tuple[str | None, ...] = ()
    encodings: tuple[str | None, ...] = ()
    parts: tuple[int | None, ...] = ()
    # What the body was built from (same order), to build it again for fewer recipients.
    message: payload.MessageSettings | None = None
    prepared: tuple[payload.Destination, ...] = ()

    @property
    def destinations(self) -> int:
        return len(self.recipient_ids)

    @property
    def attempt(self) -> int:
        """The number of this send: 1 for a first send."""
        return max(self.attempts, default=0) + 1

    def first(self, count: int) -> Batch:
        """The same batch cut to its first `count` recipients, its body built again: what
        the limiter allows when the rate fell after the claim. The rest is given back."""
        if not 0 < count < self.destinations:
            raise ValueError(f"cannot cut a batch of {self.destinations} to {count}")
        if self.message is None or len(self.prepared) != self.destinations:
            raise ValueError("a batch without its destinations cannot be cut")
        kept = self.prepared[:count]
        return dataclasses.replace(
            self,
            body=payload.build_body(self.message, kept),
            recipient_ids=self.recipient_ids[:count],
            correlation_ids=self.correlation_ids[:count],
            attempts=self.attempts[:count],
            msisdn_e164=self.msisdn_e164[:count],
            encodings=self.encodings[:count],
            parts=self.parts[:count],
            prepared=kept,
        )


class Lane:
    """One service's state shared by the producer and that service's senders."""

    def __init__(self, *, name: str, settings: ServiceSettings, queue_size: int) -> None:
        self.name = name
        self.settings = settings
        self.limiter = ServiceLimiter(
            service=name, rate_per_s=settings.rate_per_s, batch_size=settings.batch_size
        )
        self.queue: asyncio.Queue[Batch] = asyncio.Queue(maxsize=queue_size)
        self.stopped = False
        # Batches claimed by this worker and not yet posted (queued, or waiting for the
        # limiter): their leases are renewed while they wait.
        self.held: set[int] = set()
        # Claims under way whose batch will need a place in the queue (Producer.fill).
        self.claiming = 0

    def has_room(self) -> bool:
        return not self.stopped and self.queue.qsize() + self.claiming < self.queue.maxsize

    def stop(self, *, error_code: str, description: str) -> None:
        """Stop claiming and sending for this service (bad or inactive key): logged once."""
        if self.stopped:
            return
        self.stopped = True
        log.error(
            "service_stopped",
            service=self.name,
            error_code=error_code,
            description=description,
            hint="fix the service key or activate the service, then restart the worker",
        )
