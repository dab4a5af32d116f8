"""`--workers N`: one process loads the workflow and forks N workers that share the port."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import SRC, Conn, async_task, http, spawn, task, wait_healthy

sys.path.insert(0, str(SRC))


def children(pid):
    """The ids of the processes `pid` forked and that still run."""
    found = []
    for task_dir in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(p) for p in (task_dir / "children").read_text().split()]
        except OSError:
            pass
    return found


def alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_gone(pids, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(alive(p) for p in pids):
            return True
        time.sleep(0.05)
    return False


def start(site, logs, import_path, workers, **kwargs):
    adapter = spawn(site, logs, import_path, args=["--workers", str(workers)], **kwargs)
    wait_healthy(adapter)
    deadline = time.monotonic() + 30
    while len(children(adapter.proc.pid)) < workers and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(children(adapter.proc.pid)) == workers, adapter.log()
    return adapter


def pids_serving(port, connections=12, per_connection=10):
    """Runs tasks on many connections at once; the set of process ids that answered."""

    async def one(n):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        seen = set()
        try:
            for i in range(per_connection):
                lines = await async_task(reader, writer, task(f"w-{n}-{i}", {"delay": 0.01}))
                assert lines[-1]["type"] == "result", lines
                seen.add(lines[-1]["data"])
        finally:
            writer.close()
        return seen

    async def run():
        return set().union(*await asyncio.gather(*(one(n) for n in range(connections))))

    return asyncio.run(run())


def test_workers_share_the_port_and_each_serves(site, logs):
    adapter = start(site, logs, "src/whoami:whoami_workflow", 3)
    try:
        workers = set(children(adapter.proc.pid))
        # The adapter answers once its first worker listens; the others may bind a moment
        # later (a slow library's import), and until they do the first takes every
        # connection. So a few rounds at most, 10 s in all, until the spread shows.
        deadline = time.monotonic() + 10
        served = pids_serving(adapter.port)
        while len(served) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
            served |= pids_serving(adapter.port)
        # Every answer came from a worker, never from the process that supervises them, and
        # the kernel spread the connections over more than one of them.
        assert served <= workers, (served, workers)
        assert len(served) >= 2, served
        log = adapter.log()
        assert "on http://127.0.0.1:%d in 3 worker processes" % adapter.port in log
        assert log.count("deployd_adapter: serving ") == 1, log
    finally:
        adapter.stop()


def test_an_event_reaches_the_worker_that_runs_its_task(site, logs):
    from wflib import HumanResponseEvent

    from test_protocol import expected

    adapter = start(site, logs, "src/hitl:hitl_workflow", 3)
    conns = []
    try:
        # Enough tasks on their own connections that some run on other workers than the one
        # each event reaches.
        for n in range(9):
            conn = Conn(adapter.port)
            conns.append(conn)
            conn.request("POST", "/tasks", task(f"hw-{n}", {"question": "Name? "}))
            assert conn.read_head()[0] == 200
            assert json.loads(conn.read_chunk())["data"]["qualified_name"].endswith(".InputRequiredEvent")
        # An event that is not one: 400 from the worker that runs the task, wherever it is.
        status, _, body = http(adapter.port, "POST", "/tasks/hw-0/events", {"data": {"plain": "dict"}})
        assert status == 400 and "serialized" in json.loads(body)["error"], body
        # A task nobody runs: 404.
        answer = expected(HumanResponseEvent(response="x"))
        status, _, body = http(adapter.port, "POST", "/tasks/nobody/events", {"data": answer})
        assert status == 404 and "nobody" in json.loads(body)["error"], body
        for n, conn in enumerate(conns):
            answer = expected(HumanResponseEvent(response=f"p{n}"))
            status, _, body = http(adapter.port, "POST", f"/tasks/hw-{n}/events", {"data": answer})
            assert (status, json.loads(body)) == (200, {}), (n, body)
            lines = [json.loads(l) for l in conn.read_body({"transfer-encoding": "chunked"}).splitlines() if l]
            assert lines[-1]["type"] == "result" and lines[-1]["data"] == f"Hello, p{n}!", lines
    finally:
        for conn in conns:
            conn.close()
        adapter.stop()


def test_sigterm_drains_and_stops_every_worker(site, logs):
    adapter = start(site, logs, "src/echo:echo_workflow", 2)
    workers = children(adapter.proc.pid)
    with Conn(adapter.port) as conn:
        conn.request("POST", "/tasks", task("t-term", {"message": "bye", "delay": 0.3}))
        assert conn.read_head()[0] == 200
        adapter.proc.send_signal(signal.SIGTERM)
        body = conn.read_body({"transfer-encoding": "chunked"})
    assert b'"type":"result","data":"Message received: bye"' in body
    assert adapter.proc.wait(15) == 0
    assert wait_gone(workers)
    assert "stopping 2 worker(s)" in adapter.log()


def test_a_worker_that_dies_stops_the_adapter(site, logs):
    adapter = start(site, logs, "src/echo:echo_workflow", 2)
    workers = children(adapter.proc.pid)
    os.kill(workers[0], signal.SIGKILL)
    try:
        code = adapter.proc.wait(15)
    except subprocess.TimeoutExpired:
        adapter.stop()
        raise AssertionError(f"the adapter kept running without a worker:\n{adapter.log()}")
    assert code != 0
    assert wait_gone(workers)
    assert f"(pid {workers[0]}) was killed by signal 9; stopping the others" in adapter.log()


def test_workers_end_when_the_adapter_is_killed(site, logs):
    adapter = start(site, logs, "src/echo:echo_workflow", 2)
    workers = children(adapter.proc.pid)
    adapter.proc.kill()  # SIGKILL to the first process only, not to its group
    adapter.proc.wait(10)
    assert wait_gone(workers), "a worker outlived the adapter"


def test_a_load_error_is_reported_once_and_exits_2(site, logs):
    adapter = spawn(site, logs, "src/echo:missing", args=["--workers", "4"])
    assert adapter.proc.wait(60) == 2
    lines = adapter.log().strip().splitlines()
    assert lines[-1].startswith("deployd_adapter: cannot load import-path 'src/echo:missing' "), lines
    assert sum("cannot load" in line for line in lines) == 1, lines


@pytest.mark.parametrize(
    "args, env, message",
    [
        (["--workers", "0"], {}, "the number of workers is 0; use 1 to 64"),
        (["--workers", "65"], {}, "the number of workers is 65; use 1 to 64"),
        ([], {"DEPLOYD_ADAPTER_WORKERS": "two"}, "DEPLOYD_ADAPTER_WORKERS='two' is not a number"),
        ([], {"DEPLOYD_ADAPTER_WORKERS": "0"}, "DEPLOYD_ADAPTER_WORKERS must be positive"),
    ],
)
def test_a_bad_number_of_workers_exits_2(site, logs, args, env, message):
    adapter = spawn(site, logs, "src/echo:echo_workflow", args=args, env=env)
    assert adapter.proc.wait(60) == 2
    assert adapter.log().strip().splitlines()[-1] == f"deployd_adapter: {message}"


def test_the_environment_sets_the_workers(site, logs):
    adapter = spawn(site, logs, "src/echo:echo_workflow", env={"DEPLOYD_ADAPTER_WORKERS": "2"})
    try:
        wait_healthy(adapter)
        deadline = time.monotonic() + 30
        while len(children(adapter.proc.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(children(adapter.proc.pid)) == 2
    finally:
        adapter.stop()


def test_a_port_in_use_exits_1_once(site, logs):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        adapter = spawn(site, logs, "src/echo:echo_workflow", args=["--workers", "2"], port=port)
        assert adapter.proc.wait(60) == 1
    lines = adapter.log().strip().splitlines()
    assert lines[-1].startswith(f"deployd_adapter: cannot listen on 127.0.0.1:{port}:"), lines
    assert sum("cannot listen" in line for line in lines) == 1, lines
