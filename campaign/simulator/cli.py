"""`campaign simulate`: the simulator's config from the file and flags, and its run."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import math
import signal
import tomllib
from typing import Any

import structlog

from campaign import config as campaign_config
from campaign.netaddr import parse_listen
from campaign.simulator.config import SimulatorConfig, SimulatorConfigError, merge_config
from campaign.simulator.server import start_simulator

# The logger of the whole simulator, whichever module logs.
log = structlog.get_logger("campaign.simulator")


def parse_setting(text: str) -> dict[str, Any]:
    """`a.b=value` -> {"a": {"b": value}}; the value is read as TOML, else as a string."""
    name, sep, raw = text.partition("=")
    if not sep or not name.strip():
        raise SimulatorConfigError(f"--set {text!r}: expected KEY=VALUE")
    try:
        value: Any = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    result: dict[str, Any] = {}
    node = result
    parts = name.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return result


def config_from_args(args: argparse.Namespace) -> SimulatorConfig:
    """The simulator config of `campaign simulate`: the file, then flags over it."""
    overrides: dict[str, Any] = {}
    if args.key:
        overrides["keys"] = list(args.key)
    if args.rate is not None:
        overrides["rate_per_s"] = args.rate
    if args.mo_url is not None:
        overrides["mo_url"] = args.mo_url
    if args.seed is not None:
        overrides["seed"] = args.seed
    for text in args.fault or ():
        name, sep, probability = text.partition("=")
        try:
            value = float(probability)
        except ValueError:
            value = math.nan
        if not sep or math.isnan(value):
            raise SimulatorConfigError(f"--fault {text!r}: expected NAME=PROBABILITY")
        overrides = merge_config(overrides, {"faults": {name: {"probability": value}}})
    for text in args.set or ():
        overrides = merge_config(overrides, parse_setting(text))
    if args.sim_config:
        return SimulatorConfig.from_toml(args.sim_config, overrides=overrides)
    return SimulatorConfig.from_dict(overrides, source="command line")


async def cmd_simulate(args: argparse.Namespace, settings: campaign_config.Settings) -> int:
    """Run the simulator until SIGINT / SIGTERM, or send one MO with --send-mo."""
    config = config_from_args(args)
    service_keys = tuple(dict.fromkeys(s.key for s in settings.services.values() if s.key))
    if not args.key and config.keys == SimulatorConfig().keys and service_keys:
        # `campaign --config c.toml simulate` accepts the keys that c.toml sends with.
        config = dataclasses.replace(config, keys=service_keys)
        log.info("simulator_keys_from_config", keys=len(service_keys))
    if args.send_mo:
        return await _send_one_mo(config, args)
    try:
        host, port = parse_listen(args.listen)
    except ValueError:
        raise SimulatorConfigError(f"--listen {args.listen!r}: expected HOST:PORT") from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with await start_simulator(config, host=host, port=port) as simulator:
            print(f"simulator listening on {simulator.base_url}", flush=True)
            await stop.wait()
            log.info("simulator_stopping", **simulator.stats(summary=True)["destinations"])
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    return 0


async def _send_one_mo(config: SimulatorConfig, args: argparse.Namespace) -> int:
    if not args.oa or args.message is None:
        raise SimulatorConfigError("--send-mo needs --oa and --message")
    quick = dataclasses.replace(config, callback_retries=0)
    async with await start_simulator(quick) as simulator:
        result = await simulator.send_mo(oa=args.oa, message=args.message, da=args.da)
    ok = result["status"] is not None and 200 <= result["status"] < 300
    log.info("mo_sent" if ok else "mo_failed", tid=result["tid"], http_status=result["status"])
    return 0 if ok else 1
