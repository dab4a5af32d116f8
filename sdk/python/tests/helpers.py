"""Starting the adapter as a real process, and small HTTP clients to talk to it."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

SDK = Path(__file__).resolve().parents[1]
APP = Path(__file__).resolve().parent / "app"
SRC = APP / "src"


def flavor() -> str:
    """`workflows` or `core`: the library the test workflows import (run-tests.sh sets it)."""
    value = os.environ.get("DEPLOYD_TEST_FLAVOR")
    if value:
        return value
    try:
        import workflows  # noqa: F401

        return "workflows"
    except ImportError:
        return "core"


def copy_adapter(dest: Path) -> Path:
    """Copies the package's files into `dest/deployd_adapter`, as deployd does, and returns the
    folder to put on PYTHONPATH."""
    target = dest / "deployd_adapter"
    if not target.exists():
        shutil.copytree(
            SDK / "deployd_adapter", target, ignore=shutil.ignore_patterns("__pycache__")
        )
    return dest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Adapter:
    def __init__(self, proc: subprocess.Popen, port: int, log: Path) -> None:
        self.proc = proc
        self.port = port
        self.log_path = log

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


def spawn(
    site: Path,
    log_dir: Path,
    import_path: Optional[str],
    *,
    cwd: Path = APP,
    args: Optional[List[str]] = None,
    env: Optional[Dict[str, str]] = None,
    port: Optional[int] = None,
) -> Adapter:
    port = free_port() if port is None else port
    full_env = dict(os.environ)
    full_env.pop("DEPLOYD_IMPORT_PATH", None)
    full_env.update(
        {
            "PYTHONPATH": str(site),
            "PORT": str(port),
            "DEPLOYD_SERVICE": "svc",
            "DEPLOYD_DEPLOYMENT": "tests",
            "DEPLOYD_DATA_DIR": str(log_dir),
            "DEPLOYD_TEST_FLAVOR": flavor(),
            "PYTHONWARNINGS": "ignore",
        }
    )
    if import_path is not None:
        full_env["DEPLOYD_IMPORT_PATH"] = import_path
    full_env.update(env or {})
    log = log_dir / f"adapter-{port}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "deployd_adapter", *(args or [])],
            cwd=str(cwd),
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Adapter(proc, port, log)


def wait_healthy(adapter: Adapter, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if adapter.proc.poll() is not None:
            raise AssertionError(f"the adapter exited with {adapter.proc.returncode}:\n{adapter.log()}")
        try:
            status, _, body = http(adapter.port, "GET", "/healthz")
            if status == 200:
                assert json.loads(body) == {"status": "ok"}
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"the adapter did not become healthy:\n{adapter.log()}")


# -- a raw HTTP/1.1 client -------------------------------------------------------------------


class Conn:
    """One keep-alive connection, reading responses by hand (chunked or Content-Length)."""

    def __init__(self, port: int, timeout: float = 30.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.file = self.sock.makefile("rb")

    def close(self) -> None:
        try:
            self.file.close()
        finally:
            self.sock.close()

    def __enter__(self) -> "Conn":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(self, method: str, path: str, body: Any = None, headers: Optional[Dict[str, str]] = None) -> None:
        payload = b""
        if body is not None:
            payload = body if isinstance(body, bytes) else json.dumps(body).encode()
        lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
        all_headers = {"Content-Type": "application/json"} if body is not None else {}
        all_headers.update(headers or {})
        for k, v in all_headers.items():
            lines.append(f"{k}: {v}")
        if body is not None:
            lines.append(f"Content-Length: {len(payload)}")
        self.send(("\r\n".join(lines) + "\r\n\r\n").encode() + payload)

    def read_head(self) -> Tuple[int, Dict[str, str]]:
        status_line = self.file.readline()
        if not status_line:
            raise ConnectionError("closed before the status line")
        parts = status_line.decode().split(" ", 2)
        status = int(parts[1])
        headers: Dict[str, str] = {}
        while True:
            line = self.file.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            k, _, v = line.decode().partition(":")
            headers[k.strip().lower()] = v.strip()
        return status, headers

    def read_chunk(self) -> bytes:
        size_line = self.file.readline()
        size = int(size_line.strip().split(b";")[0], 16)
        data = self.file.read(size) if size else b""
        assert self.file.read(2) == b"\r\n", "a chunk must end with CRLF"
        return data

    def read_body(self, headers: Dict[str, str]) -> bytes:
        if headers.get("transfer-encoding") == "chunked":
            out = b""
            while True:
                chunk = self.read_chunk()
                if not chunk:
                    return out
                out += chunk
        if "content-length" in headers:
            return self.file.read(int(headers["content-length"]))
        return self.file.read()

    def response(self) -> Tuple[int, Dict[str, str], bytes]:
        status, headers = self.read_head()
        return status, headers, self.read_body(headers)

    def is_closed(self, wait: float = 2.0) -> bool:
        self.sock.settimeout(wait)
        try:
            return self.file.read(1) == b""
        except (socket.timeout, TimeoutError):
            return False
        except ConnectionError:
            return True


def http(port: int, method: str, path: str, body: Any = None, **kw: Any) -> Tuple[int, Dict[str, str], bytes]:
    with Conn(port) as conn:
        conn.request(method, path, body, **kw)
        return conn.response()


def ndjson(body: bytes) -> List[Dict[str, Any]]:
    return [json.loads(line) for line in body.decode().splitlines() if line.strip()]


def task(task_id: str, input: Optional[dict] = None, state: Any = None, session: str = "s1") -> dict:
    return {"task_id": task_id, "session_id": session, "attempt": 1, "input": input or {}, "state": state}


def run_task(port: int, body: dict) -> List[Dict[str, Any]]:
    status, headers, raw = http(port, "POST", "/tasks", body)
    assert status == 200, raw
    assert headers["content-type"] == "application/x-ndjson"
    return ndjson(raw)


# -- an asyncio client, for many tasks at once -------------------------------------------------


async def async_task(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, body: dict) -> List[dict]:
    payload = json.dumps(body).encode()
    writer.write(
        b"POST /tasks HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload)
    )
    await writer.drain()
    status = await reader.readline()
    assert status.startswith(b"HTTP/1.1 200"), status
    headers = {}
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        k, _, v = line.decode().partition(":")
        headers[k.strip().lower()] = v.strip()
    assert headers.get("transfer-encoding") == "chunked"
    lines = []
    while True:
        size = int((await reader.readline()).strip(), 16)
        data = await reader.readexactly(size + 2)
        if size == 0:
            return lines
        lines.append(json.loads(data[:-2]))
