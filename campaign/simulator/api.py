"""The simulated API's facts: paths, report codes, request limits and field formats.

Everything here is what the IMIconnect messaging API v1 documents (or what the simulator
settles where it does not); the other modules of the package read it, none writes it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType

MESSAGING_PATH = "/resources/v1/messaging"
STATS_PATH = "/simulate/stats"
MO_PATH = "/simulate/mo"
RESET_PATH = "/simulate/reset"

# Delivery report codes: (deliveryStatus, Description). The simulator words platform-side
# rejections "Failed" and handset / network outcomes "Un-Delivered" (the documentation
# shows both statuses without saying which code gets which).
DR_CODES: Mapping[str, tuple[str, str]] = MappingProxyType(
    {
        "7500": ("Delivered", "Delivered"),
        "7501": ("Submitted", "Submitted"),
        "7004": ("Failed", "Invalid parameters"),
        "7006": ("Failed", "Internal error"),
        "7101": ("Failed", "Invalid sender id"),
        "7102": ("Failed", "Invalid address"),
        "7107": ("Failed", "Message too long"),
        "7109": ("Failed", "Recipient on do-not-disturb list"),
        "7201": ("Un-Delivered", "Failed at operator"),
        "7202": ("Failed", "Failed at platform"),
        "7203": ("Un-Delivered", "Unknown subscriber"),
        "7204": ("Un-Delivered", "No prepaid credit"),
        "7205": ("Failed", "Binary message error"),
        "7206": ("Un-Delivered", "SIM full"),
        "7207": ("Un-Delivered", "Out of coverage"),
        "7208": ("Un-Delivered", "Message expired"),
        "7209": ("Un-Delivered", "Part of multipart failed"),
        "7210": ("Failed", "Billing error"),
        "7211": ("Failed", "Billing error"),
    }
)
INTERIM_CODE = "7501"

_DESTINATION_MANDATORY = (
    "any one of [customerid,msisdn,email, userid,pushid,psid, twitterid, wechatid] is mandatory"
)
_MSISDN = re.compile(r"\+?[1-9][0-9]{6,14}")
_SMARTLINK_REF = re.compile(r"\{\{link_([A-Za-z0-9_]+)\}\}")
_SMS_TYPES = {"1", "3", "4"}
_PRIORITIES = {"1", "2", "3"}
_JSON_HEADERS = {"Content-Type": "application/json"}
_MAX_TEXT_CHARS = 1024
_MAX_CORRELATION_BYTES = 50
_MAX_CALLBACK_DATA_CHARS = 2000
