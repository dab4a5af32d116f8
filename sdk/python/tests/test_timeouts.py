"""The server's time limits: an idle keep-alive connection is closed, a request whose headers or
body stall gets 408, and a task that takes longer than every limit is still answered.

The server runs in the test's own event loop with short limits; its runner is a stand-in that
sleeps (the limits belong to the HTTP layer, which the other tests drive with real workflows).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import pytest

from helpers import SDK

sys.path.insert(0, str(SDK))

from deployd_adapter import server as server_module  # noqa: E402
from deployd_adapter.runner import Runner  # noqa: E402

LIMIT = 0.3


class SlowRunner:
    """Answers every task with its input after `seconds`."""

    parse_task = staticmethod(Runner.parse_task)

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.running: dict = {}

    async def run(self, task_id, attempt, run_input, state, emit):
        await asyncio.sleep(self.seconds)
        await emit({"type": "result", "data": run_input, "state": None})

    async def cancel_all(self) -> None:
        pass


def scenario(monkeypatch, body, *, idle=LIMIT, head=LIMIT, task_seconds=0.0):
    """Runs `body(port)` against a server with these limits, in a fresh event loop."""
    monkeypatch.setattr(server_module, "HEAD_TIMEOUT", head)
    monkeypatch.setattr(server_module, "BODY_TIMEOUT", head)

    async def main():
        server = server_module.Server(SlowRunner(task_seconds), idle_timeout=idle)
        await server.start("127.0.0.1", 0)
        port = server._servers[0].sockets[0].getsockname()[1]
        try:
            return await asyncio.wait_for(body(port), 20)
        finally:
            await server.shutdown(0.1)

    return asyncio.run(main())


async def read_all(reader: asyncio.StreamReader) -> bytes:
    return await reader.read()


def status_and_body(raw: bytes):
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def test_an_idle_connection_is_closed_without_an_answer(monkeypatch):
    async def body(port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        started = time.monotonic()
        data = await read_all(reader)
        writer.close()
        return data, time.monotonic() - started

    data, waited = scenario(monkeypatch, body, head=5.0)
    assert data == b""
    assert LIMIT * 0.8 <= waited < 3.0, waited


@pytest.mark.parametrize(
    "partial, words",
    [
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\n", b"the request headers did not come in time"),
        (
            b"POST /tasks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n{\"task_id\"",
            b"the request body did not come in time",
        ),
    ],
)
def test_a_request_that_stalls_gets_408_naming_what_stalled(monkeypatch, partial, words):
    async def body(port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(partial)
        started = time.monotonic()
        data = await read_all(reader)
        writer.close()
        return data, time.monotonic() - started

    # The idle limit is long: what ends the request is the limit of the phase it stalled in.
    data, waited = scenario(monkeypatch, body, idle=30.0)
    status, payload = status_and_body(data)
    assert status == 408, data
    assert words in payload, payload
    assert waited < 5.0, waited


def test_a_task_longer_than_every_limit_is_answered_and_the_connection_kept(monkeypatch):
    async def body(port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        answers = []
        for i in range(2):
            payload = json.dumps({"task_id": f"t{i}", "input": {"n": i}}).encode()
            writer.write(
                b"POST /tasks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload)
            )
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200"), head
            lines = []
            while True:
                size = int((await reader.readline()).strip(), 16)
                chunk = await reader.readexactly(size + 2)
                if size == 0:
                    break
                lines.append(json.loads(chunk[:-2]))
            answers.append(lines)
        # Then the connection is idle: closed after the idle limit.
        rest = await read_all(reader)
        writer.close()
        return answers, rest

    answers, rest = scenario(monkeypatch, body, task_seconds=3 * LIMIT)
    assert answers == [
        [{"type": "result", "data": {"n": 0}, "state": None}],
        [{"type": "result", "data": {"n": 1}, "state": None}],
    ]
    assert rest == b""
