#!/usr/bin/env python3
"""Drives a running deployd adapter (or any service speaking deployd's service protocol) with N
concurrent keep-alive connections, and prints tasks/s and latency percentiles.

    PORT=8123 DEPLOYD_IMPORT_PATH=src/echo:echo_workflow python -m deployd_adapter &   # in tests/app
    python bench.py --port 8123 --connections 16 --tasks 2000 --input '{"message": "hi"}'

Loopback only, and bounded: it stops after --tasks tasks or --max-seconds seconds, whichever
comes first. Standard library only.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
import time
from typing import List, Optional, Tuple

LOOPBACK = {"127.0.0.1", "::1", "localhost"}


async def one_task(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, body: bytes
) -> Tuple[int, Optional[str]]:
    """Sends one task on an open connection; returns (events, outcome type)."""
    writer.write(
        b"POST /tasks HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (host.encode(), len(body), body)
    )
    await writer.drain()
    status = await reader.readline()
    if not status.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"unexpected answer: {status!r}")
    chunked = False
    length = None
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        name = name.strip().lower()
        if name == "transfer-encoding" and "chunked" in value.lower():
            chunked = True
        elif name == "content-length":
            length = int(value)
    if chunked:
        payload = bytearray()
        while True:
            size = int((await reader.readline()).split(b";")[0].strip(), 16)
            data = await reader.readexactly(size + 2)
            if size == 0:
                break
            payload += data[:-2]
    elif length is not None:
        payload = bytearray(await reader.readexactly(length))
    else:
        payload = bytearray(await reader.read())
    events, outcome = 0, None
    for raw in bytes(payload).splitlines():
        if not raw.strip():
            continue
        kind = json.loads(raw).get("type")
        if kind == "event":
            events += 1
        else:
            outcome = kind
    return events, outcome


async def run(args: argparse.Namespace) -> int:
    run_input = json.loads(args.input)
    if not isinstance(run_input, dict):
        print("--input must be a JSON object", file=sys.stderr)
        return 2
    counter = itertools.count()
    latencies: List[float] = []
    outcomes = {"result": 0, "error": 0, "broken": 0}
    events_seen = 0
    deadline = time.monotonic() + args.max_seconds
    started = time.monotonic()

    async def connection(n: int) -> None:
        nonlocal events_seen
        reader, writer = await asyncio.open_connection(args.host, args.port)
        try:
            while time.monotonic() < deadline:
                i = next(counter)
                if i >= args.tasks:
                    return
                body = json.dumps(
                    {
                        "task_id": f"bench-{i}",
                        "session_id": f"bench-{n}",
                        "attempt": 1,
                        "input": run_input,
                        "state": None,
                    }
                ).encode()
                t0 = time.perf_counter()
                try:
                    events, outcome = await one_task(reader, writer, args.host, body)
                except (OSError, RuntimeError, asyncio.IncompleteReadError, ValueError) as exc:
                    outcomes["broken"] += 1
                    print(f"connection {n}: {type(exc).__name__}: {exc}", file=sys.stderr)
                    return
                latencies.append(time.perf_counter() - t0)
                events_seen += events
                outcomes[outcome if outcome in outcomes else "broken"] += 1
        finally:
            writer.close()

    await asyncio.gather(*(connection(n) for n in range(args.connections)))
    elapsed = time.monotonic() - started
    done = len(latencies)
    if not done:
        print("no task completed", file=sys.stderr)
        return 1
    latencies.sort()

    def pct(p: float) -> float:
        return latencies[min(done - 1, int(p / 100 * done))] * 1000

    print(
        f"{done} tasks over {args.connections} keep-alive connections in {elapsed:.2f}s: "
        f"{done / elapsed:.1f} tasks/s"
    )
    print(f"latency ms: p50 {pct(50):.2f}  p90 {pct(90):.2f}  p99 {pct(99):.2f}  max {latencies[-1] * 1000:.2f}")
    print(
        f"outcomes: {outcomes['result']} results, {outcomes['error']} errors, "
        f"{outcomes['broken']} broken; {events_seen / done:.1f} events per task"
    )
    return 0 if outcomes["error"] == 0 and outcomes["broken"] == 0 else 1


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="loopback address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--connections", type=int, default=16, help="concurrent connections (1-512)")
    parser.add_argument("--tasks", type=int, default=2000, help="tasks in all (at most 1000000)")
    parser.add_argument("--max-seconds", type=float, default=60.0, help="stop after this long (at most 600)")
    parser.add_argument("--input", default='{"message": "bench"}', help="the task input, a JSON object")
    args = parser.parse_args(argv)
    if args.host not in LOOPBACK:
        parser.error("only a loopback address can be benchmarked")
    if not 1 <= args.connections <= 512:
        parser.error("--connections must be between 1 and 512")
    if not 1 <= args.tasks <= 1_000_000:
        parser.error("--tasks must be between 1 and 1000000")
    if not 0 < args.max_seconds <= 600:
        parser.error("--max-seconds must be in (0, 600]")
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
