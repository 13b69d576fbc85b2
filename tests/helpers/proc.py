"""The one way tests run `python -m campaign`: a port, a config file, an environment, a process.

- `free_port()`: a loopback port nothing listens on at the moment.
- `write_config(path, **sections)`: a complete worker config from `DEFAULTS`; a test names
  only the sections and keys that differ (`api={"base_url": sim.base_url}`).
- `campaign_env(dsn)`: the environment of every process (the only place that decides it).
- `CampaignProcess`: one `python -m campaign [--config X] --log-format json COMMAND ...`, its
  JSON log events, waits for an event, a line or an HTTP answer, signals, stop and kill.
- `Processes` / `processes(workdir)`: starts them, and kills every one still running on exit;
  the `campaign_process` fixture (tests/conftest.py) is one per test.
- `wait_until(check)`: poll until true; its timeout is a safety limit, never a measurement.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import re
import socket
import sys
import time
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from signal import SIGKILL, SIGTERM
from typing import Any

import aiohttp
import orjson

REPO = Path(__file__).resolve().parents[2]

# The secrets every test config and in-process Settings use; tests check that they never
# reach a log line.
SERVICE_KEY = "test-service-key-1234"
WEBHOOK_TOKEN = "test-webhook-token-5678"

# Nothing listens on the discard port: a test that sends or takes reports says where to.
_NOWHERE = "http://127.0.0.1:9"

# A worker scaled down for tests: fast polls and recovery, short backoff and grace, small
# pools (several processes share one PostgreSQL), JSON logs.
DEFAULTS: Mapping[str, Any] = {
    "database": {"pool_min": 1, "pool_max": 6, "connect_timeout_s": 5.0},
    "api": {"base_url": _NOWHERE, "timeout_s": 5.0},
    "services": {
        "default": {
            "key": SERVICE_KEY,
            "sender_id": "TESTID",
            "rate_per_s": 5000.0,
            "batch_size": 500,
            "max_in_flight": 2,
            "in_doubt_grace_s": 2.0,
            "max_attempts": 5,
        }
    },
    "producer": {
        "poll_interval_s": 0.2,
        "queue_size": 4,
        "lease_s": 10.0,
        "backoff_base_s": 0.05,
        "backoff_max_s": 0.2,
        "recovery_interval_s": 0.2,
    },
    "webhooks": {"listen": "127.0.0.1:0", "public_url": _NOWHERE, "token": WEBHOOK_TOKEN},
    # Port 0: every process its own free ops port, so workers never collide on 9100; a test
    # that reads it finds the address in the `ops_started` event (`ops_url`).
    "ops": {"listen": "127.0.0.1:0"},
    "reconciler": {"interval_s": 0.1},
    "worker": {"stats_interval_s": 0.5, "shutdown_grace_s": 10.0, "idle_max_s": 1.0},
    "logging": {"format": "json", "level": "info"},
}


def free_port() -> int:
    """A loopback port nothing listens on at the moment (for a process to bind next)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def webhooks_at(port: int) -> dict[str, str]:
    """[webhooks] keys of a receiver on 127.0.0.1:`port` that reports are POSTed to."""
    return {"listen": f"127.0.0.1:{port}", "public_url": f"http://127.0.0.1:{port}"}


def write_config(path: Path, **sections: Mapping[str, Any] | None) -> Path:
    """Write `DEFAULTS` with `sections` merged in, key by key, as TOML; returns `path`.

    A section or key given as None is left out; nested tables (`services={"default": {...}}`)
    merge the same way; a section `DEFAULTS` lacks (`retention`) is added.
    """
    table = _merge(DEFAULTS, sections)
    text = _toml_table(table, ())
    # The file must say exactly what was asked: a rendering slip fails here, not in the worker.
    assert tomllib.loads(text) == table, text
    path.write_text(text, encoding="utf-8")
    return path


def _merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    merged = {key: _plain(value) for key, value in base.items()}
    for key, value in overrides.items():
        current = merged.get(key)
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(current, dict):
            merged[key] = _merge(current, value)
        else:
            merged[key] = _plain(value)
    return merged


def _plain(value: Any) -> Any:
    """Tables as dicts without None values, tuples as lists: what tomllib reads back."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else _toml_string(key)


def _toml_string(value: str) -> str:
    escaped = []
    for ch in value:
        if ch in '"\\':
            escaped.append("\\" + ch)
        elif ch < " " or ch == "\x7f":
            escaped.append(f"\\u{ord(ch):04x}")
        else:
            escaped.append(ch)
    return '"' + "".join(escaped) + '"'


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"no TOML for {value!r} in a test config")
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML for {type(value).__name__} in a test config")


def _toml_table(table: Mapping[str, Any], path: tuple[str, ...]) -> str:
    scalars = {k: v for k, v in table.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in table.items() if isinstance(v, dict)}
    header = path and (scalars or not tables)
    lines = [f"[{'.'.join(_toml_key(p) for p in path)}]"] if header else []
    lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in scalars.items()]
    text = "\n".join(lines) + ("\n\n" if lines else "")
    for key, sub in tables.items():
        text += _toml_table(sub, (*path, key))
    return text


def campaign_env(dsn: str | None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of every `campaign` process a test starts.

    A copy of this process's environment without any CAMPAIGN_* variable: a developer's
    CAMPAIGN_CONFIG, CAMPAIGN_DATABASE_DSN or a ${CAMPAIGN_...} a config would interpolate
    never leaks in. `dsn` becomes CAMPAIGN_DATABASE_DSN; None leaves the database to the
    config file (its `dsn`, or an embedded server). `extra` adds variables that are not
    campaign's own (XDG_STATE_HOME: where the demo writes its log).
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAMPAIGN_")}
    # Output goes to files that tests read while the process runs.
    env["PYTHONUNBUFFERED"] = "1"
    if dsn is not None:
        env["CAMPAIGN_DATABASE_DSN"] = dsn
    for key, value in (extra or {}).items():
        assert not key.startswith("CAMPAIGN_"), f"{key}: pass the DSN as dsn=, settings in a config"
        env[key] = value
    return env


async def wait_until(
    check: Callable[[], Awaitable[object]],
    *,
    timeout_s: float = 60.0,
    interval_s: float = 0.05,
    what: str = "a condition",
) -> None:
    """Poll `check()` until it returns something true; the timeout is a safety limit only."""
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        await asyncio.sleep(interval_s)


class CampaignProcess:
    """A running `python -m campaign`: stderr (the JSON log) and stdout each in a file."""

    def __init__(
        self,
        *,
        name: str,
        args: tuple[str, ...],
        proc: asyncio.subprocess.Process,
        log_path: Path,
        out_path: Path,
    ) -> None:
        self.name = name
        self.args = args
        self.proc = proc
        self.log_path = log_path
        self.out_path = out_path

    def __repr__(self) -> str:
        return f"<CampaignProcess {self.name} pid={self.pid} returncode={self.returncode}>"

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def log(self) -> str:
        """Everything written to stderr so far: the log lines, and any traceback."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def stdout(self) -> str:
        return self.out_path.read_text(encoding="utf-8", errors="replace")

    def output(self) -> str:
        """stdout and stderr, labelled: for failure messages and secret checks."""
        return f"==== {self.name} stdout\n{self.stdout()}==== {self.name} stderr\n{self.log()}"

    def events(self) -> list[dict[str, Any]]:
        """The JSON log lines written so far (a line still being written is left out)."""
        complete = self.log().split("\n")[:-1]
        return [orjson.loads(line) for line in complete if line.startswith("{")]

    def event_names(self) -> list[str]:
        return [str(e.get("event")) for e in self.events()]

    async def wait_event(self, event: str, *, timeout_s: float = 60.0) -> dict[str, Any]:
        """The first log event named `event`, once written; fails if the process exits first."""
        deadline = time.monotonic() + timeout_s
        while True:
            for item in self.events():
                if item.get("event") == event:
                    return item
            self._assert_running(f"before logging {event}")
            assert time.monotonic() < deadline, f"{self.name}: no {event} in {timeout_s} s"
            await asyncio.sleep(0.05)

    async def wait_line(self, text: str, *, timeout_s: float = 60.0) -> str:
        """The first complete stdout line containing `text`."""
        deadline = time.monotonic() + timeout_s
        while True:
            for line in self.stdout().split("\n")[:-1]:
                if text in line:
                    return line
            self._assert_running(f"before printing {text!r}")
            assert time.monotonic() < deadline, f"{self.name}: no {text!r} in {timeout_s} s"
            await asyncio.sleep(0.05)

    async def ops_url(self, *, timeout_s: float = 60.0) -> str:
        """The process's ops address (http://127.0.0.1:PORT), once it is listening."""
        return str((await self.wait_event("ops_started", timeout_s=timeout_s))["url"])

    async def wait_http(self, url: str, *, timeout_s: float = 60.0) -> None:
        """Until GET `url` answers 200; fails early when the process exits."""
        deadline = time.monotonic() + timeout_s
        async with aiohttp.ClientSession() as session:
            while True:
                self._assert_running(f"before {url} answered")
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    async with session.get(url) as resp:
                        if resp.status == 200:
                            return
                assert time.monotonic() < deadline, f"{url} not answering in {timeout_s} s"
                await asyncio.sleep(0.1)

    def _assert_running(self, when: str) -> None:
        if self.proc.returncode is not None:
            raise AssertionError(
                f"{self.name} exited ({self.proc.returncode}) {when}:\n{self.output()[-5000:]}"
            )

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    async def wait(self, *, timeout_s: float = 60.0) -> int:
        """The exit code; the timeout is a safety limit (the process is killed past it)."""
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout=timeout_s)
        except TimeoutError:
            await self.kill()
            raise AssertionError(
                f"{self.name} still running after {timeout_s} s:\n{self.output()[-5000:]}"
            ) from None

    async def stop(self, signum: int = SIGTERM, *, timeout_s: float = 30.0) -> int:
        """Send `signum` and wait for the exit code; SIGKILL (and -9) past the timeout."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signum)
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout=timeout_s)
        except TimeoutError:
            await self.kill()
            return -SIGKILL

    async def kill(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        await self.proc.wait()


class Processes:
    """Starts `campaign` processes with their output in `workdir`; `kill_all()` ends them."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started: list[CampaignProcess] = []

    async def start(
        self,
        command: str,
        *args: str,
        config: Path | None = None,
        dsn: str | None = None,
        name: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> CampaignProcess:
        """`python -m campaign [--config X] --log-format json COMMAND ARGS`, started.

        Without `config` the command runs on built-in defaults; without `dsn` the database
        is the config's (see `campaign_env`).
        """
        label = name or command
        stem = f"{len(self.started) + 1:02d}-{label}"
        log_path, out_path = self.workdir / f"{stem}.log", self.workdir / f"{stem}.out"
        global_options = ("--config", str(config)) if config is not None else ()
        argv = (*global_options, "--log-format", "json", command, *args)
        with log_path.open("wb") as err, out_path.open("wb") as out:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "campaign", *argv,
                stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=err,
                cwd=REPO, env=campaign_env(dsn, env),
            )  # fmt: skip
        process = CampaignProcess(
            name=label, args=argv, proc=proc, log_path=log_path, out_path=out_path
        )
        self.started.append(process)
        return process

    async def run(
        self,
        command: str,
        *args: str,
        config: Path | None = None,
        dsn: str | None = None,
        name: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout_s: float = 120.0,
    ) -> CampaignProcess:
        """Start a command and wait for it to exit (the timeout is a safety limit)."""
        process = await self.start(command, *args, config=config, dsn=dsn, name=name, env=env)
        await process.wait(timeout_s=timeout_s)
        return process

    async def kill_all(self) -> None:
        for process in self.started:
            await process.kill()

    def outputs(self) -> str:
        return "\n".join(p.output() for p in self.started)


@contextlib.asynccontextmanager
async def processes(workdir: Path) -> AsyncIterator[Processes]:
    """A `Processes` whose processes are all killed on exit, however the block ends."""
    started = Processes(workdir)
    try:
        yield started
    finally:
        await started.kill_all()
