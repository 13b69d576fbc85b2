"""What each code in `error_code` / `dr_code` means: one table for status, logs and docs.

The API's codes (synchronous answers and delivery reports) come from the platform's
documentation (shared/reference/imiconnect-api-facts.md); ours are the reasons the worker
records itself. docs/webhooks.md lists the same table; a test keeps them equal.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

# Answers to POST /resources/v1/messaging.
API_CODES: Final[Mapping[str, str]] = MappingProxyType(
    {
        "1001": "queued by the platform",
        "7000": "invalid JSON",
        "7001": "authentication failed (service key)",
        "7002": "service key missing",
        "7003": "mandatory parameter missing",
        "7004": "invalid parameters or values",
        "7005": "request expired",
        "7006": "internal error at the platform (may be intermittent)",
        "7007": "service inactive",
        "7009": "more than 1000 destinations in one request",
        "7020": "transaction limit reached (rate or quota)",
        "7108": "invalid template id",
        "7200": "unknown status",
    }
)

# deliveryInfo.code of a delivery report.
REPORT_CODES: Final[Mapping[str, str]] = MappingProxyType(
    {
        "7500": "delivered",
        "7501": "submitted (interim, not final)",
        "7004": "invalid parameters",
        "7006": "internal error at the platform",
        "7101": "invalid sender id (not registered for this destination?)",
        "7102": "invalid address",
        "7107": "message too long",
        "7109": "recipient on a do-not-disturb list",
        "7201": "failed at the operator",
        "7202": "failed at the platform",
        "7203": "unknown subscriber",
        "7204": "no prepaid credit",
        "7205": "binary message error",
        "7206": "SIM full",
        "7207": "out of coverage",
        "7208": "message expired before delivery",
        "7209": "part of a multipart message failed",
        "7210": "billing error",
        "7211": "billing error",
    }
)

# Reasons the worker records itself.
OWN_CODES: Final[Mapping[str, str]] = MappingProxyType(
    {
        "invalid_msisdn": "not a valid phone number (phonenumbers)",
        "missing_variable": "the text names a variable the recipient does not have",
        "invalid_variable": "a variable is not text or a number",
        "unknown_smartlink": "{{link_N}} without a smartlink N on the campaign",
        "empty_text": "the text is empty after substitution",
        "text_too_long": "the text is over 1024 characters after substitution",
        "suppressed": "the number opted out (STOP)",
        "expired": "the campaign expired before this recipient was sent",
        "report_timeout": "accepted, but no final delivery report within report_timeout_s",
        "in_doubt": "the request may have reached the API; no report settled it",
        "timeout": "the API did not answer in time",
        "connection_error": "the connection to the API failed",
        "bad_response": "the API's answer was in neither documented shape",
        "no_result": "the API's answer had no result for this destination",
        "lease_expired": "the worker sending it was lost while the request was in flight",
        "worker_stopped": "the worker stopped while the request was in flight",
    }
)


def meaning(code: str | None) -> str:
    """A short meaning of any code we store; HTTP statuses as `http_NNN`."""
    if not code:
        return ""
    for table in (REPORT_CODES, API_CODES, OWN_CODES):
        if code in table:
            return table[code]
    if code.startswith("http_"):
        return f"HTTP {code[5:]} from the API"
    return "undocumented code"
