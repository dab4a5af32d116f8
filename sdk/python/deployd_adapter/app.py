"""The command line: `python -m deployd_adapter [--import-path PATH] [--port PORT] [--workers N]`.

Exit status: 0 after SIGTERM or SIGINT, 1 when the port cannot be listened on, 2 when the
arguments are wrong or the workflow cannot be loaded (the last line on stderr says why).

With `--workers N` (or `DEPLOYD_ADAPTER_WORKERS=N`) above 1, one process loads the workflow,
binds the port and forks N workers, as gunicorn's `--preload` does: the module is imported once,
a load error is reported once, and the workers share its memory until they write to it. Each
worker listens on a socket of its own bound to the port with `SO_REUSEPORT`, so the kernel
spreads the connections evenly over them (one shared listening socket would give a burst of
connections to whichever worker wakes first: asyncio accepts all it can at once). The first
process only supervises: when a worker ends on its own, the others are stopped and the adapter
exits with that worker's status (deployd restarts the instance); SIGTERM goes to every worker,
each of which drains as a single process does. A human-in-the-loop event that reaches a worker
not running its task is passed to the others over a Unix socket each (Linux's abstract namespace,
no file) and delivered by the one that runs it. Module-level state is per worker, as with any
pre-forking server; keep one worker when a workflow relies on sharing it between tasks.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any, List, Optional, Sequence

from .loader import LoadError, Loaded, load
from .runner import Runner, log
from .server import DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_BODY, Server


# The most worker processes one adapter forks.
MAX_WORKERS = 64
# How long the first process waits for its workers after their grace, before SIGKILL.
STOP_MARGIN = 5.0



class UsageError(Exception):
    pass


def run_loop(main: Any) -> Any:
    """Runs `main` in a new event loop: uvloop's when it is installed (deployd installs it in the
    environments it makes, as uvicorn's standard extra does for llama_deploy's server), unless
    `DEPLOYD_ADAPTER_UVLOOP=0`; asyncio's own otherwise."""
    if os.environ.get("DEPLOYD_ADAPTER_UVLOOP", "").strip() not in ("0", "false", "no"):
        try:
            import uvloop
        except ImportError:
            uvloop = None
        if uvloop is not None:
            if sys.version_info >= (3, 11):
                with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                    return runner.run(main)
            uvloop.install()
    return asyncio.run(main)


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
    parser.add_argument(
        "--workers",
        type=int,
        help="worker processes sharing the port (default: $DEPLOYD_ADAPTER_WORKERS or 1; at most "
        f"{MAX_WORKERS})",
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
        workers = args.workers if args.workers is not None else int(
            _env_number("DEPLOYD_ADAPTER_WORKERS", 1, int)
        )
        if not 1 <= workers <= MAX_WORKERS:
            raise UsageError(f"the number of workers is {workers}; use 1 to {MAX_WORKERS}")
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

    # What the import made (the workflow library, the user's module) lives as long as the
    # adapter: moved out of the collector's reach, a collection does not walk it again each time
    # (pauses of milliseconds in the middle of tasks), and forked workers share its pages.
    gc.collect()
    gc.freeze()

    if workers > 1:
        return supervise(loaded, import_path, host, port, max_body, grace, workers)
    try:
        return run_loop(serve(loaded, import_path, host, port, max_body, grace))
    except KeyboardInterrupt:
        return 0


def _serving(loaded: Loaded, import_path: str, host: str, port: int, workers: int) -> str:
    flavor = loaded.flavor
    service = os.environ.get("DEPLOYD_SERVICE")
    deployment = os.environ.get("DEPLOYD_DEPLOYMENT")
    whose = f" for service {service!r} of deployment {deployment!r}" if service and deployment else ""
    processes = f" in {workers} worker processes" if workers > 1 else ""
    return (
        f"serving {import_path} ({type(loaded.workflow).__name__}, {flavor.distribution} "
        f"{flavor.version}){whose} on http://{host}:{port}{processes}"
    )


async def serve(
    loaded: Loaded,
    import_path: str,
    host: str,
    port: int,
    max_body: int,
    grace: float,
    *,
    sock: Optional[socket.socket] = None,
    peers: Sequence[str] = (),
    me: Optional[str] = None,
) -> int:
    """Serves until SIGTERM or SIGINT: on `host:port`, or as a worker on the inherited `sock`,
    with `me` (its own peer socket) and `peers` (the other workers') for events."""
    runner = Runner(loaded)
    server = Server(runner, max_body=max_body, idle_timeout=DEFAULT_IDLE_TIMEOUT, peers=peers)
    try:
        if sock is None:
            await server.start(host, port)
        else:
            await server.start_on(sock, me)
    except OSError as err:
        log(f"cannot listen on {host}:{port}: {err}")
        return 1
    if sock is None:
        log(_serving(loaded, import_path, host, port, 1))

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


def _peer_name(first: int, index: int) -> str:
    # Linux's abstract namespace: a leading NUL, no file to make or remove.
    return f"\0deployd-adapter-{first}-{index}"


def _address(host: str, port: int) -> tuple:
    """The family and socket address `host:port` resolves to first, as asyncio would bind."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    if not infos:
        raise OSError(f"{host!r} resolves to no address")
    family, _, _, _, address = infos[0]
    return family, address


def _reuse_port_socket(family: int, address: tuple) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def _die_with_parent() -> None:
    """Asks Linux to SIGKILL this process when the process that forked it ends (prctl
    PR_SET_PDEATHSIG), so that no worker outlives a killed adapter. Elsewhere a no-op."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def supervise(
    loaded: Loaded,
    import_path: str,
    host: str,
    port: int,
    max_body: int,
    grace: float,
    workers: int,
) -> int:
    """Binds the port, forks `workers` workers that listen on it, and watches them."""
    try:
        family, address = _address(host, port)
        # Bound, never listening: the port is ours (a port another program listens on fails
        # here, once), and the kernel gives it no connection.
        reserved = _reuse_port_socket(family, address)
    except OSError as err:
        log(f"cannot listen on {host}:{port}: {err}")
        return 1
    address = reserved.getsockname()  # the port the kernel chose, for port 0
    first = os.getpid()
    names = [_peer_name(first, i) for i in range(workers)]
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    # Installed before forking, so a signal between two forks is not lost; each worker installs
    # its own loop's handlers.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    sys.stdout.flush()
    sys.stderr.flush()
    pids: dict[int, int] = {}  # pid -> worker index
    for index in range(workers):
        if stopping:
            break
        pid = os.fork()
        if pid == 0:  # the worker
            status = 1
            try:
                _die_with_parent()
                if os.getppid() != first:  # the first process is already gone
                    os._exit(1)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                peers = [name for i, name in enumerate(names) if i != index]
                reserved.close()
                try:
                    sock = _reuse_port_socket(family, address)
                    sock.listen(1024)
                except OSError as err:
                    log(f"worker {index}: cannot listen on {host}:{port}: {err}")
                    os._exit(1)
                status = run_loop(
                    serve(
                        loaded, import_path, host, port, max_body, grace,
                        sock=sock, peers=peers, me=names[index],
                    )
                )
            except KeyboardInterrupt:
                status = 0
            except BaseException as exc:  # noqa: BLE001 — a worker must never return into the loop below
                log(f"worker {index}: {type(exc).__name__}: {exc}")
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(status)
        pids[pid] = index
    if not stopping:
        log(_serving(loaded, import_path, host, port, workers))

    status = 0
    while pids and not stopping:
        try:
            pid, raw = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            time.sleep(0.1)
            continue
        index = pids.pop(pid, None)
        if index is None:
            continue
        code = os.waitstatus_to_exitcode(raw)
        how = f"exited with status {code}" if code >= 0 else f"was killed by signal {-code}"
        log(f"worker {index} (pid {pid}) {how}; stopping the others")
        status = code if code > 0 else 1
        break

    if stopping:
        log(f"stopping {len(pids)} worker(s), {grace:g}s for their running tasks")
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace + STOP_MARGIN
    while pids:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid:
            pids.pop(pid, None)
            continue
        if time.monotonic() >= deadline:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            for pid in list(pids):
                try:
                    os.waitpid(pid, 0)
                except ChildProcessError:
                    pass
            break
        time.sleep(0.05)
    return status
