"""[ops]: the ops address, its token and the dashboard's refresh, validated at load."""

from __future__ import annotations

import pytest

from campaign import config, netaddr


def test_defaults_bind_loopback_9100_without_a_token() -> None:
    ops = config.Settings().ops
    assert (ops.listen, ops.token, ops.refresh_s) == ("127.0.0.1:9100", "", 5.0)
    assert netaddr.parse_listen(ops.listen) == ("127.0.0.1", 9100)


@pytest.mark.parametrize("listen", ["9100", ":9100", "host:", "host:port", "h:70000"])
def test_a_listen_that_is_not_host_port_is_refused(listen: str) -> None:
    with pytest.raises(config.ConfigError, match=r"\[ops\] listen: .* is not HOST:PORT"):
        config.parse({"ops": {"listen": listen}}, source="c.toml")


def test_the_token_is_a_secret_and_refresh_must_be_positive() -> None:
    settings = config.parse({"ops": {"listen": "[::1]:0", "token": "s3cret-ops-token"}})
    assert "s3cret-ops-token" in settings.secrets()
    with pytest.raises(config.ConfigError, match="refresh_s: must be greater than 0"):
        config.parse({"ops": {"refresh_s": 0}})
    with pytest.raises(config.ConfigError, match="token: expected a string, got <secret>"):
        config.parse({"ops": {"token": 12345}})
