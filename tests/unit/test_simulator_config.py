"""Simulator configuration: TOML / dict loading, clear errors, CLI flags."""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType

import pytest

from campaign import cli
from campaign.config import Settings
from campaign.netaddr import parse_listen
from campaign.simulator import FaultSpec, SimulatorConfig, SimulatorConfigError, cmd_simulate
from campaign.simulator.cli import config_from_args, parse_setting
from campaign.simulator.config import merge_config


def test_defaults_are_valid_and_quiet() -> None:
    config = SimulatorConfig()
    assert config.keys == ("sim-key",)
    assert config.callback_retries == 3
    assert config.callback_retry_interval_s == 60.0
    assert config.dr_outcomes == {"7500": 1.0}
    assert not any(
        getattr(config.faults, name).enabled for name in config.faults.__dataclass_fields__
    )


def test_from_dict_coerces_values_and_tables() -> None:
    config = SimulatorConfig.from_dict(
        {
            "keys": ["a", "b"],
            "rate_per_s": 250,
            "rate_limit_mode": 429,
            "templates": [1, "2"],
            "dr_outcomes": {"7500": 9, "7203": 1},
            "dr_codes_by_msisdn": {"447700900001": 7102},
            "seed": 3,
            "faults": {
                "slow_response": {"probability": 0.5},
                "http_500": {"requests": [3, 4]},
                "duplicate_report": {"probability": 1, "delay_s": 2, "between_s": [0, 10]},
            },
        }
    )
    assert config.keys == ("a", "b")
    assert config.rate_per_s == 250.0
    assert config.rate_limit_mode == "429"
    assert config.templates == ("1", "2")
    assert config.dr_outcomes == MappingProxyType({"7500": 9.0, "7203": 1.0})
    assert config.dr_codes_by_msisdn == {"447700900001": "7102"}
    assert config.seed == 3
    # A fault table keeps the defaults of what it does not set.
    assert config.faults.slow_response == FaultSpec(probability=0.5, delay_s=30.0)
    # A schedule without a probability fires always within the schedule.
    assert config.faults.http_500 == FaultSpec(probability=1.0, requests=(3, 4))
    assert config.faults.duplicate_report.between_s == (0.0, 10.0)
    assert config.faults.duplicate_report.delay_s == 2.0


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"rate_per_sec": 1}, "rate_per_sec: unknown key"),
        ({"rate_per_s": "fast"}, "rate_per_s: expected a number, got 'fast'"),
        ({"rate_per_s": -1}, "rate_per_s: must not be negative"),
        ({"require_plus": "yes"}, "require_plus: expected true or false"),
        ({"dr_batch_size": 0}, "dr_batch_size: must be at least 1"),
        ({"dr_batch_size": 1.5}, "dr_batch_size: expected an integer"),
        ({"rate_limit_mode": "503"}, "rate_limit_mode: '503' is not one of '7020', '429'"),
        ({"dr_outcomes": {"7501": 1}}, "dr_outcomes: '7501' is not a final report code"),
        ({"dr_outcomes": {"9999": 1}}, "dr_outcomes: '9999' is not a final report code"),
        ({"dr_outcomes": {"7500": 0}}, "dr_outcomes: needs at least one positive weight"),
        ({"dr_outcomes": {"7500": "x"}}, "dr_outcomes.7500: expected a number"),
        ({"dr_codes_by_msisdn": {"1": "7501"}}, "dr_codes_by_msisdn: 1: '7501'"),
        ({"dr_delay_min_s": 2, "dr_delay_max_s": 1}, "dr_delay_max_s: must not be below"),
        (
            {"dr_delay_distribution": "exponential", "dr_delay_mean_s": 0.01},
            "dr_delay_mean_s: must be above dr_delay_min_s",
        ),
        ({"dr_delay_distribution": "normal"}, "dr_delay_distribution: 'normal' is not one of"),
        ({"dr_interim_ratio": 1.5}, "dr_interim_ratio: must be between 0 and 1"),
        ({"timestamp_offset": "CET"}, "timestamp_offset: expected an offset like"),
        ({"mo_url": "localhost:8080"}, "mo_url: must be an http:// or https:// URL"),
        ({"keys": [""]}, "keys: keys must not be empty strings"),
        ({"faults": []}, "faults: must be a table"),
        ({"faults": {"gremlins": {}}}, "faults.gremlins: unknown fault (known: http_500"),
        ({"faults": {"http_500": 0.5}}, "faults.http_500: must be a table"),
        ({"faults": {"http_500": {"chance": 1}}}, "faults.http_500.chance: unknown key"),
        (
            {"faults": {"http_500": {"delay_s": 1}}},
            "faults.http_500.delay_s: unknown key",
        ),
        (
            {"faults": {"http_500": {"probability": 2}}},
            "faults.http_500: probability must be between 0 and 1",
        ),
        (
            {"faults": {"http_500": {"requests": [5, 2]}}},
            "faults.http_500: requests must be [first, last]",
        ),
        (
            {"faults": {"http_500": {"requests": [1]}}},
            "faults.http_500.requests: expected [first, last]",
        ),
        (
            {"faults": {"http_500": {"between_s": [3, 3]}}},
            "faults.http_500: between_s must be [start, end]",
        ),
    ],
)
def test_bad_values_are_reported_with_their_key(raw: dict[str, object], message: str) -> None:
    with pytest.raises(SimulatorConfigError) as info:
        SimulatorConfig.from_dict(raw, source="sim.toml")
    assert str(info.value).startswith("sim.toml: ")
    assert message in str(info.value)


def test_key_values_are_never_echoed_in_errors() -> None:
    with pytest.raises(SimulatorConfigError) as info:
        SimulatorConfig.from_dict({"keys": "my-real-secret-key"})
    assert "my-real-secret-key" not in str(info.value)
    assert "keys: expected a list of strings" in str(info.value)


def test_from_toml_reads_the_file_and_applies_overrides(tmp_path: Path) -> None:
    path = tmp_path / "sim.toml"
    path.write_text(
        'keys = ["k"]\nrate_per_s = 10\n[faults.http_500]\nprobability = 0.25\nrequests = [1, 9]\n'
    )
    config = SimulatorConfig.from_toml(
        path, overrides={"rate_per_s": 20, "faults": {"http_500": {"probability": 0.5}}}
    )
    assert config.keys == ("k",)
    assert config.rate_per_s == 20.0
    assert config.faults.http_500 == FaultSpec(probability=0.5, requests=(1, 9))


def test_from_toml_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(SimulatorConfigError, match="config file not found"):
        SimulatorConfig.from_toml(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("keys = [")
    with pytest.raises(SimulatorConfigError, match=r"bad\.toml: not valid TOML"):
        SimulatorConfig.from_toml(bad)
    wrong = tmp_path / "wrong.toml"
    wrong.write_text("burst_s = 0\n")
    with pytest.raises(SimulatorConfigError, match=r"wrong\.toml: burst_s: must be greater"):
        SimulatorConfig.from_toml(wrong)


def test_direct_construction_is_validated_too() -> None:
    with pytest.raises(SimulatorConfigError, match="callback_retries"):
        SimulatorConfig(callback_retries=-1)


def test_merge_config_merges_tables_and_replaces_values() -> None:
    base = {"a": 1, "faults": {"x": {"probability": 0.1, "delay_s": 3}}}
    merged = merge_config(base, {"a": 2, "faults": {"x": {"probability": 0.9}}})
    assert merged == {"a": 2, "faults": {"x": {"probability": 0.9, "delay_s": 3}}}
    assert base["a"] == 1


def test_parse_setting_reads_toml_values_and_dotted_keys() -> None:
    assert parse_setting("dr_batch_size=100") == {"dr_batch_size": 100}
    assert parse_setting("faults.slow_response.delay_s=2.5") == {
        "faults": {"slow_response": {"delay_s": 2.5}}
    }
    assert parse_setting('templates=["1", "2"]') == {"templates": ["1", "2"]}
    assert parse_setting("queued_description=Queued in burst mode") == {
        "queued_description": "Queued in burst mode"
    }
    with pytest.raises(SimulatorConfigError, match="expected KEY=VALUE"):
        parse_setting("dr_batch_size")


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:9090") == ("127.0.0.1", 9090)
    assert parse_listen("[::1]:0") == ("::1", 0)
    for bad in ("9090", "host:", ":9090", "host:http", "host:\u00b2"):
        with pytest.raises(ValueError, match="is not host:port"):
            parse_listen(bad)


async def test_simulate_names_a_bad_listen_flag() -> None:
    args = cli.build_parser().parse_args(["simulate", "--listen", "9090"])
    with pytest.raises(SimulatorConfigError, match="--listen '9090': expected HOST:PORT"):
        await cmd_simulate(args, Settings())


def test_cli_flags_override_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "sim.toml"
    path.write_text('keys = ["file"]\nrate_per_s = 5\nmo_url = "http://127.0.0.1:1/mo"\n')
    args = cli.build_parser().parse_args(
        [
            "simulate",
            "--config",
            str(path),
            "--key",
            "k1",
            "--key",
            "k2",
            "--rate",
            "50",
            "--seed",
            "9",
            "--fault",
            "http_500=0.1",
            "--set",
            "faults.http_500.requests=[1, 5]",
            "--set",
            "dr_batch_size=10",
        ]
    )
    config = config_from_args(args)
    assert config.keys == ("k1", "k2")
    assert config.rate_per_s == 50.0
    assert config.seed == 9
    assert config.mo_url == "http://127.0.0.1:1/mo"
    assert config.faults.http_500 == FaultSpec(probability=0.1, requests=(1, 5))
    assert config.dr_batch_size == 10
    # The top-level --config (the campaign config) is not taken by the subcommand's.
    assert args.config is None


def test_cli_fault_flag_errors() -> None:
    parser = cli.build_parser()
    for flag in ("http_500", "http_500=often", "http_500=nan"):
        args = parser.parse_args(["simulate", "--fault", flag])
        with pytest.raises(SimulatorConfigError, match="expected NAME=PROBABILITY"):
            config_from_args(args)
    args = parser.parse_args(["simulate", "--fault", "gremlins=0.5"])
    with pytest.raises(SimulatorConfigError, match=r"command line: faults\.gremlins"):
        config_from_args(args)
