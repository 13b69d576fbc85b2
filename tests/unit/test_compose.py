"""docker-compose.yml cannot run here (no Docker engine), so it is checked by reading:
services, ports and environment must agree with config.example.toml, the simulator's
example config, the Dockerfile and the CLI."""

import re
import shlex
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from campaign import cli

ROOT = Path(__file__).resolve().parents[2]
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand(value: str, env: dict[str, str]) -> str:
    def repl(m: re.Match[str]) -> str:
        return env.get(m.group(1), m.group(2) or "")

    return _VAR.sub(repl, value)


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def _env(service: dict[str, Any]) -> dict[str, str]:
    return {k: _expand(str(v), {}) for k, v in service["environment"].items()}


def test_services_healthchecks_and_volume() -> None:
    services = _compose()["services"]
    assert set(services) == {"postgres", "migrate", "simulator", "webhooks", "worker"}
    for name in ("postgres", "simulator", "webhooks"):
        assert "healthcheck" in services[name], f"{name} has no healthcheck"
    assert "pgdata:/var/lib/postgresql/data" in services["postgres"]["volumes"]
    assert "pgdata" in _compose()["volumes"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("webhooks", "worker"):
        assert (
            services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        )


def test_every_secret_of_the_example_config_is_provided() -> None:
    lines = (ROOT / "config.example.toml").read_text().splitlines()
    example = "\n".join(line for line in lines if not line.lstrip().startswith("#"))
    required = {m.group(1) for m in _VAR.finditer(example) if m.group(2) is None}
    assert required, "the example config references no environment variable"
    for name in ("migrate", "simulator", "webhooks", "worker"):
        env = _env(_compose()["services"][name])
        missing = required - set(env)
        assert not missing, f"{name} lacks {missing}"
        assert env["CAMPAIGN_CONFIG"] == "/etc/campaign/config.toml"


def test_urls_and_ports_agree() -> None:
    services = _compose()["services"]
    env = _env(services["worker"])
    pg = {k: _expand(str(v), {}) for k, v in services["postgres"]["environment"].items()}
    dsn = urlsplit(env["CAMPAIGN_DATABASE_DSN"])
    assert dsn.hostname == "postgres" and dsn.port == 5432
    assert dsn.username == pg["POSTGRES_USER"] and dsn.password == pg["POSTGRES_PASSWORD"]
    assert dsn.path == f"/{pg['POSTGRES_DB']}"

    sim_cmd = services["simulator"]["command"]
    sim_listen = sim_cmd[sim_cmd.index("--listen") + 1]
    api = urlsplit(env["CAMPAIGN_API_BASE_URL"])
    assert api.hostname == "simulator" and api.port == int(sim_listen.rsplit(":", 1)[1])
    # Only the receiver is published on the host: nothing clashes with a local server.
    assert "ports" not in services["simulator"] and "ports" not in services["postgres"]

    listen_port = int(env["CAMPAIGN_WEBHOOK_LISTEN"].rsplit(":", 1)[1])
    public = urlsplit(env["CAMPAIGN_PUBLIC_URL"])
    assert public.hostname == "webhooks" and public.port == listen_port
    assert f"${{CAMPAIGN_WEBHOOK_PORT:-8080}}:{listen_port}" in services["webhooks"]["ports"]
    assert "ports" not in services["worker"], "a published port would stop --scale worker=N"


def test_simulator_accepts_the_worker_key() -> None:
    sim_cfg = tomllib.loads((ROOT / "simulator.example.toml").read_text())
    key = _env(_compose()["services"]["worker"])["IMI_SERVICE_KEY"]
    assert key in sim_cfg["keys"]


def test_dockerfile_ships_the_configs_the_services_use() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "COPY config.example.toml /etc/campaign/config.toml" in dockerfile
    sim_cmd = _compose()["services"]["simulator"]["command"]
    sim_config = sim_cmd[sim_cmd.index("--sim-config") + 1]
    assert f"COPY simulator.example.toml {sim_config}" in dockerfile
    assert 'ENTRYPOINT ["campaign"]' in dockerfile


def test_every_command_parses_with_the_cli() -> None:
    parser = cli.build_parser()
    for name, service in _compose()["services"].items():
        if "command" not in service:
            continue
        command = service["command"]
        args = command if isinstance(command, list) else shlex.split(command)
        parsed = parser.parse_args(args)
        assert parsed.command == args[0], name


def test_every_campaign_service_has_a_healthcheck_on_its_ops_address() -> None:
    services = _compose()["services"]
    ops_listen = _env(services["worker"])["CAMPAIGN_OPS_LISTEN"]
    host, _, port = ops_listen.rpartition(":")
    # Inside the container, on every interface: a Prometheus on the network scrapes it.
    assert host == "0.0.0.0"
    for name in ("webhooks", "worker"):
        test = " ".join(services[name]["healthcheck"]["test"])
        assert f"http://127.0.0.1:{port}/readyz" in test, name
        parsed = cli.build_parser().parse_args(services[name]["command"])
        # No --ops-listen in the commands: the config's [ops] listen is what is checked.
        assert parsed.ops_listen is None, name
    # The dashboard is published on the host's loopback only, by the receiver alone.
    ops_ports = [p for p in services["webhooks"]["ports"] if p.endswith(f":{port}")]
    assert ops_ports == [f"127.0.0.1:${{CAMPAIGN_OPS_PORT:-{port}}}:{port}"]
    example = tomllib.loads((ROOT / "config.example.toml").read_text())
    assert example["ops"]["listen"] == "${CAMPAIGN_OPS_LISTEN:-127.0.0.1:9100}"
