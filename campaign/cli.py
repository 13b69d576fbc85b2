"""The `campaign` command line. Logging is configured here, once."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import structlog

from campaign import __version__, config, db, logs, worker
from campaign.commands import check, control, demo, importer, prune, report, status
from campaign.simulator import cmd_simulate

log = structlog.get_logger("campaign.cli")

Handler = Callable[[argparse.Namespace, config.Settings], Coroutine[Any, Any, int]]


class _Help(argparse.RawDescriptionHelpFormatter):
    """Defaults shown after each option's help (those worth showing); descriptions keep
    their line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        shown = action.default not in (None, False, argparse.SUPPRESS)
        if shown and "%(default)" not in text and action.option_strings:
            text += " (default: %(default)s)"
        return text


def _command(
    sub: Any, name: str, summary: str, description: str | None = None
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(
        name, help=summary, description=description or summary, formatter_class=_Help
    )
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="campaign",
        description="Bulk SMS campaigns from PostgreSQL to the IMIconnect messaging API.\n\n"
        "Applications insert campaigns and recipients into PostgreSQL; `campaign worker`\n"
        "sends them. See README.md for the database contract and the config keys.",
        formatter_class=_Help,
    )
    parser.add_argument("--version", action="version", version=f"campaign {__version__}")
    parser.add_argument(
        "--config",
        metavar="PATH",
        help=f"TOML config file (default: ${config.ENV_CONFIG}, else built-in "
        "defaults with an embedded database)",
    )
    parser.add_argument(
        "--log-format", choices=["auto", "json", "console"], help="override [logging] format"
    )
    parser.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        help="override [logging] level",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _command(
        sub,
        "migrate",
        "apply database migrations (safe to repeat)",
        "Create or upgrade the `campaign` schema to this version. Forward-only, safe to run\n"
        "again and from several processes at once (an advisory lock serialises them).",
    )
    p.set_defaults(handler=control.cmd_migrate)

    for name, text in (
        ("pause", "stop new batches of a campaign; in-flight ones finish"),
        ("resume", "let a paused or draft campaign send again"),
        ("cancel", "cancel a campaign; unsent recipients become cancelled"),
    ):
        p = _command(sub, name, text)
        p.add_argument("campaign_id", type=int, help="the campaign's id")
        p.set_defaults(handler=control.cmd_control)

    p = _command(
        sub,
        "import",
        "load recipients from a CSV file with COPY",
        "Load recipients from CSV: the msisdn column is the number, every other column a\n"
        "variable for $(name) placeholders. The delimiter (, ; tab |) is detected.",
    )
    p.add_argument("campaign_id", type=int, help="the campaign's id (not cancelled)")
    p.add_argument("file", help="CSV file, UTF-8, with a header row")
    p.set_defaults(handler=importer.cmd_import)

    p = _command(
        sub,
        "status",
        "counts per status, rate, ETA and report lag",
        "Recipients per status, the top reasons for invalid / failed / rejected, the rate\n"
        "over the last minute, the ETA of a running campaign and the report lag.",
    )
    p.add_argument("campaign_id", type=int, nargs="?", help="one campaign (default: recent ones)")
    p.add_argument(
        "--watch", action="store_true", help="refresh until the campaign is final (or Ctrl-C)"
    )
    p.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--limit", type=int, default=20, help="campaigns shown at most")
    p.set_defaults(handler=status.cmd_status)

    p = _command(
        sub,
        "report",
        "one campaign's dashboard figures as JSON, or as one HTML file",
        "The figures of the dashboard for one campaign (funnel, sends and reports per\n"
        "second, report delay percentiles, failures by code). --html FILE writes them as\n"
        "one self-contained page to send to stakeholders; without it, JSON on stdout.",
    )
    p.add_argument("campaign_id", type=int, help="the campaign's id")
    p.add_argument("--html", metavar="FILE", help="write a self-contained HTML report here")
    p.set_defaults(handler=report.cmd_report)

    p = _command(
        sub,
        "check",
        "what sending a campaign would do, without sending",
        "Read-only, in any status: runs the producer's own checks over the pending\n"
        "recipients and prints how many would be sent, invalid (by reason), suppressed,\n"
        "duplicate or capped; encodings and parts, the characters that force UCS-2, the\n"
        "cost from [pricing]. Exit 0 whatever it finds, 2 for an unknown campaign or service.",
    )
    p.add_argument("campaign_id", type=int, help="the campaign to check")
    p.add_argument("--json", action="store_true", help="one JSON document")
    p.add_argument("--sample", type=int, default=0, help="show the first N texts to be sent")
    p.set_defaults(handler=check.cmd_check)

    p = _command(
        sub,
        "prune",
        "delete rows past the [retention] settings, in small chunks",
        "Delete finished campaigns, reports, batches, incoming messages and rejects older\n"
        "than the [retention] settings, in bounded chunks (see docs/scaling.md).",
    )
    p.set_defaults(handler=prune.cmd_prune)

    p = _command(
        sub,
        "demo",
        "run the whole product on this machine",
        "An embedded PostgreSQL (unless a DSN is configured), the built-in API simulator and\n"
        "a worker in one process: a seeded campaign is sent, reported and summarised. The\n"
        "terminal shows progress and warnings; every event goes to the log file.",
    )
    p.add_argument("--recipients", type=int, default=20_000, help="recipients to seed")
    p.add_argument(
        "--rate", type=float, default=20_000.0, help="service rate in destinations per second"
    )
    p.add_argument(
        "--log-file",
        metavar="PATH",
        help=f"where the log goes, as JSON lines (default: {demo.default_log_file()})",
    )
    p.add_argument(
        "--reset",
        action="store_true",
        help="delete the embedded database (and every campaign in it), then exit",
    )
    p.set_defaults(handler=demo.run)

    p = _command(
        sub,
        "worker",
        "claim pending recipients and send them; receive and match reports",
        "The long-running worker: every role in one process by default (producer, senders,\n"
        "webhook receiver, reconciler). Switch roles off to run them apart (docs/scaling.md).",
    )
    p.add_argument(
        "--drain",
        action="store_true",
        help="exit once nothing is pending, sending or in doubt for runnable campaigns",
    )
    p.add_argument("--worker-id", metavar="ID", help="override [worker] worker_id")
    p.add_argument(
        "--no-sender",
        action="store_true",
        help="do not claim or send (run only the receiver and/or reconciler)",
    )
    p.add_argument(
        "--no-webhooks",
        action="store_true",
        help="do not run the DR / MO receiver (another process does)",
    )
    p.add_argument(
        "--no-reconciler", action="store_true", help="do not match reports (another process does)"
    )
    p.add_argument("--ops-listen", metavar="HOST:PORT", help="override [ops] listen")
    p.set_defaults(handler=worker.cmd_worker)

    p = _command(
        sub,
        "webhooks",
        "run the delivery report / incoming message receiver and the reconciler",
        "The receiver of delivery reports (DR) and incoming messages (MO), and the reconciler\n"
        "that matches reports to recipients; no sending (see docs/webhooks.md).",
    )
    p.add_argument("--listen", metavar="HOST:PORT", help="override [webhooks] listen")
    p.add_argument("--ops-listen", metavar="HOST:PORT", help="override [ops] listen")
    p.set_defaults(handler=worker.cmd_webhooks)

    p = _command(
        sub,
        "simulate",
        "run the fault-injecting simulator of the messaging API",
        "A local stand-in for the IMIconnect messaging API: accepts requests, sends delivery\n"
        "reports to each request's notifyurl, injects faults (see docs/simulator.md). Without\n"
        "--key or keys in --sim-config it accepts the service keys of the campaign config.",
    )
    p.add_argument(
        "--listen", default="127.0.0.1:9090", metavar="HOST:PORT", help="address to serve on"
    )
    p.add_argument(
        "--sim-config",
        "--config",
        dest="sim_config",
        metavar="PATH",
        help="simulator TOML file (knobs, see simulator.example.toml); "
        "the global --config is the campaign config",
    )
    p.add_argument("--key", action="append", help="accepted service key (repeatable)")
    p.add_argument("--rate", type=float, help="destinations per second per key (0: no limit)")
    p.add_argument("--mo-url", help="where incoming messages (MO) are POSTed")
    p.add_argument("--seed", type=int, help="random seed (outcomes, delays, faults)")
    p.add_argument(
        "--fault",
        action="append",
        metavar="NAME=PROBABILITY",
        help="inject a fault with this probability (repeatable; names in docs/simulator.md)",
    )
    p.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="any knob, e.g. dr_batch_size=100"
    )
    p.add_argument("--send-mo", action="store_true", help="send one MO (--oa, --message), exit")
    p.add_argument("--oa", help="with --send-mo: the customer's number")
    p.add_argument("--message", help="with --send-mo: the text")
    p.add_argument("--da", help="with --send-mo: the short code (default: mo_da)")
    p.set_defaults(handler=cmd_simulate)

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = config.load(args.config)
    except config.ConfigError as exc:
        print(f"campaign: {exc}", file=sys.stderr)
        return 2
    logs.configure(
        fmt=args.log_format or settings.logging.format,
        level=args.log_level or settings.logging.level,
        secrets=settings.secrets(),
    )
    handler: Handler = args.handler
    try:
        return asyncio.run(handler(args, settings))
    except KeyboardInterrupt:
        return 130
    except (
        db.SchemaError,
        db.QueryError,
        db.DatabaseConfigError,
        db.DatabaseUnreachable,
        config.ConfigError,
    ) as exc:
        log.error("command_failed", command=args.command, error=str(exc))
        return 2
    except (OSError, db.PostgresError, db.InterfaceError) as exc:
        log.error(
            "command_failed", command=args.command, error=str(exc), error_type=type(exc).__name__
        )
        return 1
    except Exception as exc:
        # A role crashed: say so in one structured line (with the traceback) and exit
        # non-zero, so a supervisor restarts the worker instead of it hanging half-alive.
        log.exception(
            "command_failed", command=args.command, error=str(exc), error_type=type(exc).__name__
        )
        return 1
