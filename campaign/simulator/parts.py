"""SMS parts of a text, for the optional `messageCount` of delivery reports."""

from __future__ import annotations

import math

# The simulator keeps its own GSM-7 tables, independent of campaign/sms.py on purpose: it
# is an independent check of the sender's part counting, so sharing the tables would hide
# a bug in both.
_GSM7_BASIC = set(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
_GSM7_EXTENDED = set("^{}\\[~]|€\f")


def sms_parts(text: str) -> int:
    """Parts of an SMS: GSM-7 160/153 (extension characters count two), else UCS-2 70/67."""
    if all(ch in _GSM7_BASIC or ch in _GSM7_EXTENDED for ch in text):
        units = len(text) + sum(1 for ch in text if ch in _GSM7_EXTENDED)
        single, multi = 160, 153
    else:
        units = len(text.encode("utf-16-le")) // 2
        single, multi = 70, 67
    return 1 if units <= single else math.ceil(units / multi)
