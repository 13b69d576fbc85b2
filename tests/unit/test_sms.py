import pytest
from hypothesis import given
from hypothesis import strategies as st

from campaign import sms

# --- msisdn ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "region", "expected"),
    [
        ("919812345678", "", "+919812345678"),
        ("+919812345678", "", "+919812345678"),
        ("00919812345678", "", "+919812345678"),
        (" +91 98123 45678 ", "", "+919812345678"),
        ("+91-98123-45678", "", "+919812345678"),
        ("9812345678", "IN", "+919812345678"),
        ("09812345678", "IN", "+919812345678"),
        ("919812345678", "IN", "+919812345678"),
        ("07911 123456", "gb", "+447911123456"),
        ("447911123456", "GB", "+447911123456"),
        ("14155550100", "IN", "+14155550100"),
    ],
)
def test_normalise_msisdn_to_e164(raw: str, region: str, expected: str) -> None:
    assert sms.normalise_msisdn(raw, default_region=region) == expected


@pytest.mark.parametrize(
    ("raw", "region", "reason"),
    [
        ("", "", "empty"),
        ("abc", "", "not a phone number"),
        ("12", "", "not a phone number"),
        ("09812345678", "", "no default_region"),
        ("+99912345678", "", "unknown country code"),
        ("+4479111234567890", "", "too long"),
        ("+9198123", "", "too short"),
        # Ofcom's drama range: possible-looking but not a number that can exist.
        ("+447700900123", "", "not a valid number"),
    ],
)
def test_normalise_msisdn_says_why_a_number_is_invalid(raw: str, region: str, reason: str) -> None:
    with pytest.raises(sms.InvalidRecipient) as info:
        sms.normalise_msisdn(raw, default_region=region)
    assert info.value.code == "invalid_msisdn"
    assert reason in info.value.message


def test_api_msisdn_with_and_without_plus() -> None:
    assert sms.api_msisdn("+919812345678", plus_prefix=False) == "919812345678"
    assert sms.api_msisdn("+919812345678", plus_prefix=True) == "+919812345678"


# --- variables -------------------------------------------------------------------------


def test_substitute_replaces_every_variable() -> None:
    text = sms.substitute("Hi $(name), $(n) points. Bye $(name)", {"name": "Ann", "n": 12})
    assert text == "Hi Ann, 12 points. Bye Ann"


def test_substitute_does_not_rescan_values() -> None:
    assert sms.substitute("$(a)", {"a": "$(b)", "b": "x"}) == "$(b)"


@pytest.mark.parametrize(
    ("body", "variables", "code", "names"),
    [
        ("Hi $(name)", {}, "missing_variable", "name"),
        ("$(b) $(a) $(b)", {}, "missing_variable", "a, b"),
        ("Hi $(first name)", {}, "missing_variable", "first name"),
        ("Hi $()", {}, "missing_variable", ""),
        ("Hi $(name)", {"name": None}, "invalid_variable", "name"),
        ("Hi $(name)", {"name": True}, "invalid_variable", "name"),
        ("Hi $(name)", {"name": ["x"]}, "invalid_variable", "name"),
    ],
)
def test_substitute_refuses_missing_or_odd_variables(
    body: str, variables: dict[str, object], code: str, names: str
) -> None:
    with pytest.raises(sms.InvalidRecipient) as info:
        sms.substitute(body, variables)
    assert info.value.code == code
    assert names in info.value.message


@given(
    st.text(alphabet="ab$() ", max_size=30),
    st.dictionaries(st.sampled_from(["a", "b", "ab"]), st.text(alphabet="xy", max_size=3)),
)
def test_substitute_never_leaves_a_variable_reference(body: str, variables: dict[str, str]) -> None:
    try:
        text = sms.substitute(body, variables)
    except sms.InvalidRecipient:
        return
    # Values hold no '$', so any "$(...)" left would be an unsubstituted reference.
    assert sms._VARIABLE.search(text) is None


# --- links -----------------------------------------------------------------------------


def test_link_ids_in_order_without_repeats() -> None:
    assert sms.link_ids("a {{link_5}} b {{link_x-1}} {{link_5}} {{link_}} {link_7}") == (
        "5",
        "x-1",
    )


# --- encoding and parts ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "encoding", "units", "parts"),
    [
        ("a" * 160, "gsm7", 160, 1),
        ("a" * 161, "gsm7", 161, 2),
        ("a" * 306, "gsm7", 306, 2),
        ("a" * 307, "gsm7", 307, 3),
        ("€" * 80, "gsm7", 160, 1),
        ("€" * 81, "gsm7", 162, 2),
        ("a" * 159 + "^", "gsm7", 161, 2),
        ("{}[]~|\\^€", "gsm7", 18, 1),
        ("@£$¥èéùìòÇØøÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ¡ÄÖÑÜ§¿äöñüà", "gsm7", 41, 1),
        ("a" * 69 + "é", "gsm7", 70, 1),
        ("a" * 69 + "ç", "ucs2", 70, 1),
        ("ç" * 71, "ucs2", 71, 2),
        ("ç" * 134, "ucs2", 134, 2),
        ("ç" * 135, "ucs2", 135, 3),
        ("😀" * 35, "ucs2", 70, 1),
        ("😀" * 36, "ucs2", 72, 2),
        ("नमस्ते", "ucs2", 6, 1),
    ],
)
def test_segments(text: str, encoding: str, units: int, parts: int) -> None:
    assert sms.segments(text) == sms.Segments(encoding, units, parts)  # type: ignore[arg-type]


def test_parts_never_split_an_escape_or_a_surrogate_pair() -> None:
    # 152 plain septets then an escaped one: the pair moves to part two, 153 + 2 + ...
    assert sms.segments("a" * 152 + "€" + "a" * 152).parts == 3
    assert sms.segments("a" * 152 + "€" + "a" * 151).parts == 2
    assert sms.segments("a" * 66 + "😀" + "a" * 66).parts == 3
    assert sms.segments("a" * 66 + "😀" + "a" * 65).parts == 2


# --- render ----------------------------------------------------------------------------


def test_render_counts_the_substituted_text() -> None:
    rendered = sms.render("Hi $(name) {{link_5}}", {"name": "Zoë"})
    assert rendered == sms.Rendered("Hi Zoë {{link_5}}", "ucs2", 1, ("5",))


def test_render_limits_length_and_refuses_empty_texts() -> None:
    assert len(sms.render("$(t)", {"t": "a" * 1024}).text) == 1024
    with pytest.raises(sms.InvalidRecipient) as info:
        sms.render("$(t)", {"t": "a" * 1025})
    assert info.value.code == "text_too_long"
    with pytest.raises(sms.InvalidRecipient) as info:
        sms.render("$(t)", {"t": " "})
    assert info.value.code == "empty_text"
