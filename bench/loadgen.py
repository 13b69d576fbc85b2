"""A bounded HTTP/1.1 load generator for delivery reports, run in its own process.

`python -m bench.loadgen --url URL --requests N` posts N distinct delivery reports (one
per request, the documented shape) over keep-alive connections and prints one JSON line:
requests, answers by status, duration. It speaks raw HTTP on asyncio streams because the
aiohttp client tops out near the speed of the handler it should be measuring.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import sys
import time
from urllib.parse import urlsplit

import orjson


def report_body(n: int, *, reports_per_request: int) -> bytes:
    items = [
        {
            "deliveryInfoNotification": {
                "deliveryInfo": {
                    "deliveryChannel": "SMS",
                    "Description": "Delivered",
                    "destinationType": "msisdn",
                    "timeStamp": "2024-05-01T10:00:00.000",
                    "code": "7500",
                    "deliveryStatus": "Delivered",
                    "destination": f"9198{i:08d}",
                },
                "correlationid": f"r{i + 1}",
                "transid": f"bench-{i}",
            }
        }
        for i in range(n * reports_per_request, (n + 1) * reports_per_request)
    ]
    return orjson.dumps(items[0] if reports_per_request == 1 else items)


async def _connection(
    host: str,
    port: int,
    requests: list[bytes],
    statuses: collections.Counter[int],
    deadline: float,
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        for request in requests:
            if time.monotonic() > deadline:
                return
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            status = int(lines[0].split(b" ", 2)[1])
            length = 0
            for line in lines[1:]:
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            if length:
                await reader.readexactly(length)
            statuses[status] += 1
    finally:
        writer.close()


async def run(
    *, url: str, requests: int, connections: int, reports_per_request: int, timeout_s: float
) -> dict[str, object]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    head = (
        f"POST {parts.path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        "Content-Type: application/json\r\nContent-Length: "
    ).encode()
    # Every request is built before the clock starts.
    shares: list[list[bytes]] = [[] for _ in range(connections)]
    for n in range(requests):
        body = report_body(n, reports_per_request=reports_per_request)
        shares[n % connections].append(head + str(len(body)).encode() + b"\r\n\r\n" + body)
    statuses: collections.Counter[int] = collections.Counter()
    started = time.monotonic()
    deadline = started + timeout_s
    await asyncio.gather(
        *(_connection(host, port, share, statuses, deadline) for share in shares if share)
    )
    duration_s = time.monotonic() - started
    return {
        "requests": sum(statuses.values()),
        "reports": sum(statuses.values()) * reports_per_request,
        "statuses": {str(k): v for k, v in statuses.items()},
        "duration_s": duration_s,
        "timed_out": time.monotonic() > deadline,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen")
    parser.add_argument("--url", required=True)
    parser.add_argument("--requests", type=int, required=True)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--reports-per-request", type=int, default=1)
    parser.add_argument("--timeout-s", type=float, default=120.0)
    args = parser.parse_args(argv)
    result = asyncio.run(
        run(
            url=args.url,
            requests=args.requests,
            connections=args.connections,
            reports_per_request=args.reports_per_request,
            timeout_s=args.timeout_s,
        )
    )
    sys.stdout.write(orjson.dumps(result).decode() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
