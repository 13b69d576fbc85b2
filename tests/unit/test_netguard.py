import ipaddress

from campaign import logs, netguard


def _guard(*networks: str) -> netguard.ConnectionGuard:
    return netguard.ConnectionGuard(
        networks=[ipaddress.ip_network(n) for n in networks],
        read_timeout_s=1.0,
        throttle=logs.LogThrottle(),
    )


def test_allow_list_at_accept() -> None:
    assert _guard().allows("198.51.100.7") and _guard().allows(None)
    guard = _guard("203.0.113.0/24", "2001:db8::/32")
    assert guard.allows("203.0.113.9") and guard.allows("2001:db8::1")
    # A dual-stack listener's view of an IPv4 peer.
    assert guard.allows("::ffff:203.0.113.9")
    assert not guard.allows("198.51.100.7") and not guard.allows("::ffff:198.51.100.7")
    assert not guard.allows(None) and not guard.allows("not-an-address")
