"""Network addresses as settings and flags write them; pure, so any server can import it."""

from __future__ import annotations


def parse_listen(listen: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' -> (host, port); ValueError with the value otherwise."""
    host, sep, port = listen.rpartition(":")
    # isdecimal, not isdigit: int() takes every decimal digit but not "²" and the like.
    if not sep or not port.isdecimal() or not host:
        raise ValueError(f"listen address {listen!r} is not host:port")
    return host.strip("[]"), int(port)
