"""Loading the workflow from an import-path, and the process's exit status."""

import json
import signal
import socket
import subprocess
import time

import pytest

from helpers import APP, SRC, http, spawn, wait_healthy, run_task, task


def run_to_exit(site, logs, import_path, **kwargs):
    adapter = spawn(site, logs, import_path, **kwargs)
    try:
        code = adapter.proc.wait(60)
    except subprocess.TimeoutExpired:
        adapter.stop()
        raise AssertionError(f"the adapter did not exit:\n{adapter.log()}")
    lines = adapter.log().strip().splitlines()
    return code, lines


@pytest.mark.parametrize(
    "import_path, module, attribute, last",
    [
        ("src/nope:workflow", "nope", "workflow", "ModuleNotFoundError: No module named 'nope'"),
        ("nowhere/deep/nope:wf", "nope", "wf", "ModuleNotFoundError: No module named 'nope'"),
        (
            "src/echo:missing",
            "echo",
            "missing",
            "AttributeError: module 'echo' has no attribute 'missing'",
        ),
        (
            "src/echo:not_a_workflow",
            "echo",
            "not_a_workflow",
            "TypeError: 'not_a_workflow' is a str, not a Workflow instance",
        ),
        (
            "src/echo:EchoWorkflow",
            "echo",
            "EchoWorkflow",
            "TypeError: 'EchoWorkflow' is a Workflow class, not an instance",
        ),
        ("src/broken:workflow", "broken", "workflow", "RuntimeError: broken at import time"),
    ],
)
def test_a_workflow_that_cannot_be_loaded_exits_2_with_one_clear_line(
    site, logs, import_path, module, attribute, last
):
    code, lines = run_to_exit(site, logs, import_path)
    assert code == 2, lines
    line = lines[-1]
    assert line.startswith(f"deployd_adapter: cannot load import-path '{import_path}' ")
    assert f"module '{module}' in " in line
    assert f"attribute '{attribute}'" in line
    assert last in line, line


def test_an_error_inside_the_module_prints_its_traceback_first(site, logs):
    _, lines = run_to_exit(site, logs, "src/broken:workflow")
    assert any(line.startswith("Traceback") for line in lines[:-1])
    assert 'broken.py", line' in "\n".join(lines)


@pytest.mark.parametrize("import_path", ["src/echo", "a:b:c", ":wf", "src/echo:", "/abs/echo:wf"])
def test_a_malformed_import_path_exits_2(site, logs, import_path):
    code, lines = run_to_exit(site, logs, import_path)
    assert code == 2
    assert lines[-1].startswith("deployd_adapter: invalid import-path"), lines


def test_no_import_path_or_no_port_exits_2(site, logs):
    code, lines = run_to_exit(site, logs, None)
    assert code == 2 and "DEPLOYD_IMPORT_PATH" in lines[-1]
    code, lines = run_to_exit(site, logs, "src/echo:echo_workflow", env={"PORT": ""})
    assert code == 2 and "PORT" in lines[-1]
    code, lines = run_to_exit(site, logs, "src/echo:echo_workflow", env={"PORT": "http"})
    assert code == 2 and "PORT" in lines[-1]


def test_a_port_in_use_exits_1(site, logs):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, lines = run_to_exit(site, logs, "src/echo:echo_workflow", port=port)
    assert code == 1
    assert lines[-1].startswith(f"deployd_adapter: cannot listen on 127.0.0.1:{port}:")


@pytest.mark.parametrize(
    "cwd, import_path",
    [
        # The deployment's folder (a git checkout): the path as written.
        (APP, "src/echo:echo_workflow"),
        # The copy of a local source `location: src`: the path without its leading `src/`.
        (SRC, "src/echo:echo_workflow"),
        (SRC, "echo:echo_workflow"),
        (SRC, "./echo:echo_workflow"),
        (APP, "src/echo.py:echo_workflow"),
    ],
)
def test_the_import_path_is_found_from_the_source_root(site, logs, cwd, import_path):
    adapter = spawn(site, logs, import_path, cwd=cwd)
    try:
        wait_healthy(adapter)
        lines = run_task(adapter.port, task("t", {"message": "where"}))
        assert lines[-1]["data"] == "Message received: where"
    finally:
        assert adapter.stop() == 0


def test_the_command_line_wins_over_the_environment(site, logs):
    adapter = spawn(
        site, logs, "src/nope:nothing", args=["--import-path", "src/counter:counter"]
    )
    try:
        wait_healthy(adapter)
        assert run_task(adapter.port, task("t"))[-1]["data"] == 1
    finally:
        adapter.stop()


def test_sigterm_lets_a_running_task_finish_then_exits_0(site, logs):
    adapter = spawn(site, logs, "src/echo:echo_workflow")
    wait_healthy(adapter)
    with socket.create_connection(("127.0.0.1", adapter.port)) as sock:
        body = json.dumps(task("t-term", {"message": "bye", "delay": 0.3})).encode()
        sock.sendall(
            b"POST /tasks HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        time.sleep(0.2)
        started = time.monotonic()
        adapter.proc.send_signal(signal.SIGTERM)
        data = b""
        sock.settimeout(10)
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    assert b'"type":"result","data":"Message received: bye"' in data
    assert adapter.proc.wait(10) == 0
    assert time.monotonic() - started < 5
    # No new connection is taken once it stops.
    with pytest.raises(OSError):
        http(adapter.port, "GET", "/healthz")
