"""What a send attempt's answer means, pure: response parsing and one `classify` function.

The API answers HTTP 200 in two shapes: a list of per-destination results
(`{"response": [{code, description, transid, correlationid}, ...]}`) or a single error
object (`{"response": {code, description, transid}}`). Transport failures are judged by
whether the body may have left this process: before that, retrying cannot duplicate a
message; after it, the outcome is in doubt. An HTTP answer always comes after the whole
body was sent, so a 5xx is in doubt too unless it says the request was refused.
"""

from __future__ import annotations

import email.utils
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import orjson

Kind = Literal["ok", "retry", "in_doubt", "stop_service", "rejected", "expired"]
DestinationKind = Literal["queued", "retry", "rejected", "expired"]

QUEUED = "1001"
RATE_LIMITED = "7020"
# The request's `expiry` had passed when the platform read it: nothing was sent, and
# nothing should be (the same end as a campaign that expired before its rows were sent).
REQUEST_EXPIRED = "7005"
# 7020: over the tenant's transaction rate; 7006: internal error, documented as intermittent.
RETRY_CODES = frozenset({RATE_LIMITED, "7006"})
# Bad, missing or inactive service key: every further request would fail the same way.
STOP_CODES = frozenset({"7001", "7002", "7007"})


# Per recipient, a thousand per batch: not frozen, whose __init__ is slower (performance.md).
@dataclass(slots=True)
class DestinationResult:
    code: str
    description: str
    transid: str | None
    correlation_id: str | None

    @property
    def kind(self) -> DestinationKind:
        return destination_kind(self.code)


@dataclass(frozen=True, slots=True)
class Outcome:
    kind: Kind
    code: str
    description: str
    retry_after_s: float | None = None
    # Per-destination results when kind is "ok".
    results: tuple[DestinationResult, ...] = ()


class ResponseError(ValueError):
    """A response body in neither documented shape."""


def destination_kind(code: str) -> DestinationKind:
    if code == QUEUED:
        return "queued"
    if code in RETRY_CODES:
        return "retry"
    if code == REQUEST_EXPIRED:
        return "expired"
    return "rejected"


def _text(value: Any) -> str | None:
    # The common cases first: this runs four times per result, 1000 results per answer.
    if value is None or type(value) is str:
        return value
    if isinstance(value, str | int) and not isinstance(value, bool):
        return str(value)
    raise ResponseError(f"expected text, got {type(value).__name__}")


def _result(item: Any) -> DestinationResult:
    if type(item) is dict:
        # The usual item, all four members text: no further checks (1000 per answer).
        code, description = item.get("code"), item.get("description")
        transid, correlation_id = item.get("transid"), item.get("correlationid")
        if (
            type(code) is str
            and code
            and type(description) is str
            and type(transid) is str
            and type(correlation_id) is str
        ):
            return DestinationResult(code, description, transid or None, correlation_id or None)
    if not isinstance(item, dict):
        raise ResponseError("a response item is not an object")
    code = _text(item.get("code"))
    if not code:
        raise ResponseError("a response item has no code")
    return DestinationResult(
        code=code,
        description=_text(item.get("description")) or "",
        transid=_text(item.get("transid")) or None,
        correlation_id=_text(item.get("correlationid")) or None,
    )


def parse_response(body: bytes) -> list[DestinationResult] | DestinationResult:
    """A list of per-destination results, or the single object of a request-level answer."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ResponseError(f"not JSON: {exc}") from None
    if not isinstance(data, dict) or "response" not in data:
        raise ResponseError("no `response` member")
    response = data["response"]
    if isinstance(response, list):
        return [_result(item) for item in response]
    return _result(response)


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return max(0.0, (moment - (now or datetime.now(UTC))).total_seconds())


def classify(
    http_status: int | None,
    body: bytes | BaseException | None,
    *,
    body_sent: bool,
    retry_after: str | None = None,
) -> Outcome:
    """Decide what a send attempt's answer (or failure) means for its recipients."""
    if isinstance(body, BaseException):
        timeout = isinstance(body, TimeoutError)
        code = "timeout" if timeout else "connection_error"
        description = str(body) or type(body).__name__
        if body_sent:
            # The API may have accepted the request: sending again could duplicate it.
            return Outcome("in_doubt", code, description)
        return Outcome("retry", code, description)
    if http_status is None:
        raise ValueError("classify needs an HTTP status or an exception")

    # Parsed once (a 1000-result answer is not cheap): the request-level error object
    # names the code of a non-2xx answer, and a 2xx answer's results are read from it.
    parsed: list[DestinationResult] | DestinationResult | None = None
    parse_error: ResponseError | None = None
    try:
        parsed = parse_response(body or b"")
    except ResponseError as exc:
        parse_error = exc
    api = parsed if isinstance(parsed, DestinationResult) else None
    code = api.code if api else f"http_{http_status}"
    description = api.description if api else f"HTTP {http_status}"

    if http_status == 429:
        # Rate limiting refuses a request before it is processed (the API's own answer to
        # that is 7020 with HTTP 200; 429 is undocumented for v1 but handled the same way).
        return Outcome("retry", code, description, retry_after_s=parse_retry_after(retry_after))
    if http_status >= 500:
        # An HTTP answer means the whole body was sent, and a 5xx does not say whether the
        # platform processed it: a gateway answers 502 / 504 when the platform's answer is
        # lost or late, after the messages were queued, and a 500 may come from a failure
        # after queueing. The API documents no 5xx (its errors come with HTTP 200), so a 5xx
        # is in doubt, like a timeout, unless the answer itself says the request was refused:
        # - the body is the platform's own request-level error object: the platform
        #   answered for itself, and its code decides as with HTTP 200 (7006, 7020: retry);
        # - a 503 with a readable Retry-After: "unable to handle the request" now, come back
        #   later (RFC 9110 15.6.4), what load shedding and maintenance windows answer
        #   before processing. Proxies answering for a lost or reset upstream (502, 504,
        #   Envoy's 503 "upstream reset") send no Retry-After, so they stay in doubt.
        # In doubt costs a wait for the delivery reports (on_timeout), a retry after the
        # platform queued the messages costs a duplicate SMS for every destination.
        wait_s = parse_retry_after(retry_after)
        if api is not None and api.code != QUEUED:
            return _request_error(api, retry_after_s=wait_s)
        if http_status == 503 and wait_s is not None:
            return Outcome("retry", code, description, retry_after_s=wait_s)
        return Outcome("in_doubt", code, description)
    if (api and api.code in STOP_CODES) or http_status in (401, 403):
        return Outcome("stop_service", code, description)
    if 300 <= http_status < 400:
        # Redirects are not followed (a POST would turn into a GET): the base_url is wrong.
        return Outcome("stop_service", code, "redirected: check api.base_url")
    if 400 <= http_status < 500 or http_status < 200:
        return Outcome("rejected", code, description)

    if parsed is None:
        # A 2xx we cannot read may still mean the messages were queued.
        return Outcome("in_doubt", "bad_response", str(parse_error))
    if isinstance(parsed, list):
        return Outcome("ok", QUEUED, "results", results=tuple(parsed))
    if parsed.code == QUEUED:
        return Outcome("ok", QUEUED, parsed.description, results=(parsed,))
    return _request_error(parsed)


def _request_error(error: DestinationResult, *, retry_after_s: float | None = None) -> Outcome:
    """The platform's own refusal of a whole request (its single error object)."""
    if error.code in STOP_CODES:
        return Outcome("stop_service", error.code, error.description)
    if error.code in RETRY_CODES:
        return Outcome("retry", error.code, error.description, retry_after_s=retry_after_s)
    if error.code == REQUEST_EXPIRED:
        return Outcome("expired", error.code, error.description)
    return Outcome("rejected", error.code, error.description)
