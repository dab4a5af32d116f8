"""The command line: `python -m deployd_adapter [--import-path PATH] [--port PORT]`.

Exit status: 0 after SIGTERM or SIGINT, 1 when the port cannot be listened on, 2 when the
arguments are wrong or the workflow cannot be loaded (the last line on stderr says why).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import List, Optional

from .loader import LoadError, Loaded, load
from .runner import Runner, log
from .server import DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_BODY, Server


class UsageError(Exception):
    pass


def _env_number(name: str, default: float, kind: type = float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise UsageError(f"{name}={raw!r} is not a number") from None
    if value <= 0:
        raise UsageError(f"{name} must be positive")
    return value


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m deployd_adapter",
        description="Serve one llama-index Workflow over deployd's service protocol.",
    )
    parser.add_argument(
        "--import-path",
        help="`path/to/module:attribute` of the workflow instance, relative to the working "
        "directory (default: $DEPLOYD_IMPORT_PATH)",
    )
    parser.add_argument("--port", type=int, help="port to listen on (default: $PORT)")
    parser.add_argument("--host", help="address to listen on (default: $HOST or 127.0.0.1)")
    parser.add_argument(
        "--max-body",
        type=int,
        help="largest request body in bytes (default: $DEPLOYD_ADAPTER_MAX_BODY or 64 MiB)",
    )
    parser.add_argument(
        "--grace",
        type=float,
        help="seconds running tasks get to finish after SIGTERM (default: "
        "$DEPLOYD_ADAPTER_GRACE or 4)",
    )
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        import_path = args.import_path or os.environ.get("DEPLOYD_IMPORT_PATH", "").strip()
        if not import_path:
            raise UsageError("no workflow to serve: set DEPLOYD_IMPORT_PATH or pass --import-path")
        port = args.port
        if port is None:
            raw = os.environ.get("PORT", "").strip()
            if not raw:
                raise UsageError("no port: set PORT or pass --port")
            try:
                port = int(raw)
            except ValueError:
                raise UsageError(f"PORT={raw!r} is not a port number") from None
        if not 0 <= port <= 65535:
            raise UsageError(f"port {port} is out of range")
        host = args.host or os.environ.get("HOST", "").strip() or "127.0.0.1"
        max_body = args.max_body or int(_env_number("DEPLOYD_ADAPTER_MAX_BODY", DEFAULT_MAX_BODY, int))
        grace = args.grace if args.grace is not None else _env_number("DEPLOYD_ADAPTER_GRACE", 4.0)
    except UsageError as err:
        log(str(err))
        return 2

    try:
        # deployd lays out the deployment's root as llama_deploy does (a local source's folder
        # under its location's name) and names it; the working directory otherwise.
        root = os.environ.get("DEPLOYD_IMPORT_ROOT", "").strip()
        loaded = load(import_path, Path(root) if root else Path.cwd())
    except LoadError as err:
        sys.stdout.flush()
        log(str(err))
        return 2

    try:
        return asyncio.run(serve(loaded, import_path, host, port, max_body, grace))
    except KeyboardInterrupt:
        return 0


async def serve(
    loaded: Loaded, import_path: str, host: str, port: int, max_body: int, grace: float
) -> int:
    runner = Runner(loaded)
    server = Server(runner, max_body=max_body, idle_timeout=DEFAULT_IDLE_TIMEOUT)
    try:
        await server.start(host, port)
    except OSError as err:
        log(f"cannot listen on {host}:{port}: {err}")
        return 1

    flavor = loaded.flavor
    service = os.environ.get("DEPLOYD_SERVICE")
    deployment = os.environ.get("DEPLOYD_DEPLOYMENT")
    whose = f" for service {service!r} of deployment {deployment!r}" if service and deployment else ""
    log(
        f"serving {import_path} ({type(loaded.workflow).__name__}, {flavor.distribution} "
        f"{flavor.version}){whose} on http://{host}:{port}"
    )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not on this platform
            pass
    await stop.wait()
    running = len(runner.running)
    log(f"stopping ({running} task(s) running, {grace:g}s to finish)")
    await server.shutdown(grace)
    return 0
