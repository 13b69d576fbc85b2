"""The test helpers every process test relies on: the config writer and the environment."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from campaign import config
from tests.helpers.proc import DEFAULTS, campaign_env, webhooks_at, write_config


def test_defaults_are_a_complete_valid_worker_config(tmp_path: Path) -> None:
    settings = config.load(write_config(tmp_path / "c.toml"))
    assert settings.services["default"].key == DEFAULTS["services"]["default"]["key"]
    assert settings.database.dsn == "", "the DSN comes from the environment, not the file"


def test_overrides_merge_key_by_key_and_none_removes(tmp_path: Path) -> None:
    token = 'a "quoted" \\ back\tslash \x01 token'
    path = write_config(
        tmp_path / "c.toml",
        services={"default": {"rate_per_s": 40.0, "sender_id": None}, "other": {"key": "k2"}},
        webhooks=webhooks_at(4321) | {"token": token},
        retention={"campaigns_days": 30},
        logging=None,
    )
    raw = tomllib.loads(path.read_text(encoding="utf-8"))
    default = raw["services"]["default"]
    assert default["rate_per_s"] == 40.0
    assert "sender_id" not in default
    assert default["batch_size"] == DEFAULTS["services"]["default"]["batch_size"]
    assert raw["services"]["other"] == {"key": "k2"}
    assert raw["webhooks"]["token"] == token
    assert raw["webhooks"]["listen"] == "127.0.0.1:4321"
    assert raw["retention"] == {"campaigns_days": 30}
    assert "logging" not in raw
    assert raw["producer"] == DEFAULTS["producer"]


def test_environment_drops_every_campaign_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAMPAIGN_CONFIG", "/home/dev/campaign.toml")
    monkeypatch.setenv("CAMPAIGN_DATABASE_DSN", "postgresql://dev@prod/campaign")
    monkeypatch.setenv("CAMPAIGN_WEBHOOK_TOKEN", "from-the-shell")
    monkeypatch.setenv("UNRELATED", "kept")
    env = campaign_env("postgresql://t@127.0.0.1/test")
    assert {k: v for k, v in env.items() if k.startswith("CAMPAIGN_")} == {
        "CAMPAIGN_DATABASE_DSN": "postgresql://t@127.0.0.1/test"
    }
    assert env["UNRELATED"] == "kept"
    assert not any(k.startswith("CAMPAIGN_") for k in campaign_env(None))
