import dataclasses
import re
import tomllib
from pathlib import Path

import pytest

from campaign import config
from tests.helpers.proc import Processes

ROOT = Path(__file__).resolve().parents[2]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_defaults_without_a_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(config.ENV_CONFIG, raising=False)
    settings = config.load()
    assert settings.api.base_url == "https://api.imiconnect.com"
    assert settings.services == {}


def test_example_file_loads_and_documents_every_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAMPAIGN_DATABASE_DSN", "postgresql://u:pw@h/db")
    monkeypatch.setenv("IMI_SERVICE_KEY", "k" * 32)
    monkeypatch.setenv("CAMPAIGN_WEBHOOK_TOKEN", "t" * 32)
    example = ROOT / "config.example.toml"
    settings = config.load(example)
    assert settings.services["default"].key == "k" * 32
    raw = tomllib.loads(example.read_text())
    # Every field of every section appears in the example, and with its default value
    # (secrets and the DSN come from the environment; a service's values are examples).
    for section in dataclasses.fields(config.Settings):
        if section.name == "source":
            continue
        if section.name == "services":
            cls: type = config.ServiceSettings
            table = raw["services"]["default"]
        else:
            cls = type(getattr(config.Settings(), section.name))
            table = raw[section.name]
        for f in dataclasses.fields(cls):
            assert f.name in table, f"config.example.toml lacks [{section.name}] {f.name}"
            value = table[f.name]
            fallback = re.fullmatch(r"\$\{[A-Z_]+:-(.*)\}", str(value))
            if fallback:
                value = fallback.group(1)
            elif "${" in str(value) or section.name == "services":
                continue
            default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
            expected = list(default) if isinstance(default, tuple) else default
            assert value == expected, f"[{section.name}] {f.name} differs from default"


def test_env_interpolation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_KEY", "abc123secret")
    path = _write(tmp_path, '[services.s1]\nkey = "pre-${MY_KEY}"\nrate_per_s = 50\n')
    settings = config.load(path)
    assert settings.services["s1"].key == "pre-abc123secret"
    assert settings.services["s1"].rate_per_s == 50.0
    assert "pre-abc123secret" in settings.secrets()


def test_env_interpolation_with_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CAMPAIGN_TEST_BASE", raising=False)
    path = _write(tmp_path, '[api]\nbase_url = "${CAMPAIGN_TEST_BASE:-http://127.0.0.1:9090}"\n')
    assert config.load(path).api.base_url == "http://127.0.0.1:9090"
    monkeypatch.setenv("CAMPAIGN_TEST_BASE", "http://sim:9090")
    assert config.load(path).api.base_url == "http://sim:9090"


def test_environment_dsn_wins_over_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path, '[database]\ndsn = "postgresql://file/db"\n')
    monkeypatch.delenv(config.ENV_DSN, raising=False)
    assert config.load(path).database_dsn == "postgresql://file/db"
    monkeypatch.setenv(config.ENV_DSN, "postgresql://env/db")
    assert config.load(path).database_dsn == "postgresql://env/db"


CASES = [
    ("[nope]\nx = 1\n", "unknown section [nope]"),
    ("[api]\nbase_uri = 'x'\n", "[api] base_uri: unknown key"),
    ("[api]\ntimeout_s = 'ten'\n", "[api] timeout_s: expected a number"),
    ("[database]\npool_max = 2.5\n", "[database] pool_max: expected an integer"),
    ("[services.a]\nkey = 'k'\nplus_prefix = 'yes'\n", "plus_prefix: expected true or false"),
    (
        "[services.a]\nkey = 'k'\nrate_per_s = 0\n",
        "[services.a] rate_per_s: must be greater than 0",
    ),
    ("[services.a]\nrate_per_s = 10\n", "[services.a] key: missing"),
    (
        "[services.a]\nkey = '${CAMPAIGN_TEST_UNSET_VAR}'\n",
        "[services.a] key: environment variable CAMPAIGN_TEST_UNSET_VAR is not set",
    ),
    ("[services.a]\nkey = 'k'\nbatch_size = 1001\n", "batch_size: must be between 1 and 1000"),
    ("[services.a]\nkey = 'k'\non_timeout = 'maybe'\n", "on_timeout: 'maybe' is not one of"),
    ("[logging]\nformat = 'xml'\n", "[logging] format: 'xml' is not one of"),
    ("[webhooks]\ntoken = ''\n", "[webhooks] token: missing"),
    # The token is a URL path segment: a '/' (half of all base64 tokens), '?', '#' or '%'
    # would make every report URL a 404 the platform never retries.
    *(
        (f"[webhooks]\ntoken = 'abc{c}def123'\n", "[webhooks] token: may hold only letters, digits")
        for c in "/?#% +="
    ),
    ("[optout]\nstop_keywords = 'STOP'\n", "stop_keywords: expected a list of strings"),
    ("[database]\npool_min = 5\npool_max = 2\n", "pool_min: must not exceed pool_max"),
    (
        "[reconciler]\norphan_after_s = 100\n",
        "[reconciler] orphan_after_s: 100 s must be longer than [producer] lease_s + "
        "[api] timeout_s (130 s)",
    ),
    (
        "[producer]\nlease_s = 3600\n",
        "[reconciler] orphan_after_s: 3600 s must be longer than [producer] lease_s + "
        "[api] timeout_s (3610 s)",
    ),
    (
        "[webhooks]\ntoken = 't'\nreport_timezone = 'Mars/Olympus'\n",
        "[webhooks] report_timezone: 'Mars/Olympus' is not an IANA time zone name",
    ),
    ("[webhooks]\ntoken = 't'\nreport_timezone = '+05:30'\n", "report_timezone: '+05:30'"),
    ("[api\n", "not valid TOML"),
    ("services = 3\n", "[services] must hold tables"),
]


def test_service_base_url_and_report_timezone(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "[api]\nbase_url = 'https://api.imiconnect.com'\n"
        "[services.eu]\nkey = 'k1'\nbase_url = 'https://api.imiconnect.eu'\n"
        "[services.plain]\nkey = 'k2'\n"
        "[webhooks]\ntoken = 't'\nreport_timezone = 'Asia/Kolkata'\n",
    )
    settings = config.load(path)
    assert settings.services["eu"].base_url == "https://api.imiconnect.eu"
    assert settings.services["plain"].base_url == ""
    assert settings.webhooks.report_timezone == "Asia/Kolkata"
    assert config.WebhookSettings().report_timezone == "UTC"


@pytest.mark.parametrize(("text", "message"), CASES)
def test_invalid_files_give_one_clear_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, message: str
) -> None:
    monkeypatch.delenv("CAMPAIGN_TEST_UNSET_VAR", raising=False)
    path = _write(tmp_path, text)
    with pytest.raises(config.ConfigError) as info:
        config.load(path)
    text_of_error = str(info.value)
    assert message in text_of_error
    assert text_of_error.startswith(str(path))
    assert "\n" not in text_of_error


def test_wrong_type_of_secret_is_not_echoed(tmp_path: Path) -> None:
    path = _write(tmp_path, "[services.a]\nkey = 123456789\n")
    with pytest.raises(config.ConfigError) as info:
        config.load(path)
    assert "123456789" not in str(info.value)
    assert "<secret>" in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="config file not found"):
        config.load(tmp_path / "absent.toml")


async def test_cli_exits_non_zero_with_one_line_naming_key_and_file(
    tmp_path: Path, campaign_process: Processes
) -> None:
    path = _write(tmp_path, "[services.a]\nkey = 'k'\nrate_per_s = 0\n")
    result = await campaign_process.run("migrate", config=path)
    assert result.returncode == 2
    lines = result.log().strip().splitlines()
    assert len(lines) == 1
    assert str(path) in lines[0] and "rate_per_s" in lines[0]


@pytest.mark.parametrize("token", ["Zm9v/YmFy+cXV4", "abc?def", "abc#def", "abc%2Fdef"])
async def test_webhook_token_outside_url_safe_characters_exits_2_with_a_hint(
    tmp_path: Path, token: str, campaign_process: Processes
) -> None:
    path = _write(tmp_path, f"[webhooks]\ntoken = '{token}'\n")
    # A loopback port nothing listens on: were the token accepted, migrate would fail on
    # the connection instead, with a line that does not name the token setting.
    result = await campaign_process.run(
        "migrate", config=path, dsn="postgresql://nobody@127.0.0.1:9/none"
    )
    assert result.returncode == 2
    (line,) = result.log().strip().splitlines()
    assert "[webhooks] token" in line and str(path) in line
    assert "openssl rand -hex 32" in line and "token_urlsafe" in line
    assert token not in line


def test_url_safe_webhook_tokens_load() -> None:
    for token in ("a" * 64, "Ab-9_x.y~z", "0123456789abcdef"):
        settings = config.parse({"webhooks": {"token": token}})
        assert settings.webhooks.token == token


# (DSN, as logged, the passwords a log redactor must know): every way a password is written.
DSNS = [
    ("postgresql://app:S3cretPw@db:5432/x", "postgresql://app:***@db:5432/x", ["S3cretPw"]),
    ("postgresql://app@db/prod", "postgresql://app@db/prod", []),
    (
        "postgresql://app@db/prod?password=S3cretPw",
        "postgresql://app@db/prod?password=***",
        ["S3cretPw"],
    ),
    (
        "postgres://app@db/prod?sslmode=require&PASSWORD=S3c%26ret+Pw&application_name=w",
        "postgres://app@db/prod?sslmode=require&PASSWORD=***&application_name=w",
        ["S3c%26ret+Pw", "S3c&ret+Pw", "S3c&ret Pw"],
    ),
    # An unencoded '@' (or '/', '?', ':') in the password: masked up to the last '@'.
    ("postgresql://app:p@ss:w/o?rd@db/x", "postgresql://app:***@db/x", ["p@ss:w/o?rd"]),
    ("postgresql://app:S%40cret@db/x", "postgresql://app:***@db/x", ["S%40cret", "S@cret"]),
    ("postgresql://:OnlyPw@h1:5432,h2:5433/x", "postgresql://:***@h1:5432,h2:5433/x", ["OnlyPw"]),
    (
        "postgresql://app:UrlPw@db/x?sslpassword=KeyPw",
        "postgresql://app:***@db/x?sslpassword=***",
        ["UrlPw", "KeyPw"],
    ),
    (
        "host=db user=app password=S3cretPw dbname=prod",
        "host=db user=app password=*** dbname=prod",
        ["S3cretPw"],
    ),
    (
        "host=db password = 'S3 cr\\'et\\\\Pw' dbname=prod",
        "host=db password = *** dbname=prod",
        ["'S3 cr\\'et\\\\Pw'", "S3 cr'et\\Pw"],
    ),
    ("", "", []),
]


@pytest.mark.parametrize(("dsn", "masked", "passwords"), DSNS)
def test_every_form_of_dsn_password_is_masked_and_known_to_the_redactor(
    dsn: str, masked: str, passwords: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert config.mask_dsn(dsn) == masked
    assert sorted(config.dsn_passwords(dsn)) == sorted(passwords)
    monkeypatch.setenv(config.ENV_DSN, dsn)
    assert set(passwords) <= set(config.Settings().secrets())


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[services.s]\nkey = 'k'\nsend_window = '9-21'\n", "send_window: '9-21' is not like"),
        ("[services.s]\nkey = 'k'\nsend_window = '09:00-24:00'\n", "does not exist"),
        ("[services.s]\nkey = 'k'\nsend_window = '09:00-09:00'\n", "same time"),
        ("[services.s]\nkey = 'k'\ndefault_timezone = 'Mars/Base'\n", "default_timezone:"),
        ("[policy]\ncanary_wait_s = 0\n", "[policy] canary_wait_s: must be greater than 0"),
        ("[policy]\nfailure_window = 0\n", "[policy] failure_window: must be greater than 0"),
    ],
)
def test_guard_rail_keys_are_checked(text: str, message: str) -> None:
    with pytest.raises(config.ConfigError, match=re.escape(message)):
        config.parse(tomllib.loads(text))


def test_guard_rail_keys() -> None:
    settings = config.parse(
        tomllib.loads(
            "[services.s]\nkey = 'k'\nsend_window = '22:00-06:00'\n"
            "default_timezone = 'Europe/London'\n[policy]\ncanary_wait_s = 30\n"
            "failure_window = 200\n"
        )
    )
    assert settings.services["s"].send_window == "22:00-06:00"
    assert settings.services["s"].default_timezone == "Europe/London"
    assert (settings.policy.canary_wait_s, settings.policy.failure_window) == (30.0, 200)
    defaults = config.Settings()
    assert (defaults.policy.canary_wait_s, defaults.policy.failure_window) == (600.0, 1000)
