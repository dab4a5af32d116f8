"""POST /tasks and POST /tasks/{id}/events against real workflows, through a real process."""

import asyncio
import json
import sys
import time

import pytest

from helpers import SRC, Conn, async_task, flavor, http, ndjson, run_task, task

sys.path.insert(0, str(SRC))


def serializer():
    if flavor() == "core":
        from llama_index.core.workflow import JsonSerializer
    else:
        from workflows.context import JsonSerializer
    return JsonSerializer()


def expected(event):
    """What llama_deploy 0.9 streams for an event: JsonSerializer's JSON, parsed back."""
    return json.loads(serializer().serialize(event))


@pytest.fixture(scope="module")
def echo(serve):
    return serve("src/echo:echo_workflow")


def test_healthz(echo):
    status, headers, body = http(echo.port, "GET", "/healthz")
    assert status == 200
    assert headers["content-type"] == "application/json"
    assert json.loads(body) == {"status": "ok"}


def test_the_log_names_the_workflow_and_its_library(echo):
    from wflib import Workflow

    # The library the workflow's class comes from (llama-index-core 0.12.4x and later re-export
    # llama-index-workflows' classes under llama_index.core.workflow).
    library = "llama-index-core" if Workflow.__module__.startswith("llama_index") else "llama-index-workflows"
    first = echo.log().splitlines()[0]
    assert f"serving src/echo:echo_workflow (EchoWorkflow, {library} " in first
    assert "for service 'svc' of deployment 'tests'" in first
    assert f"127.0.0.1:{echo.port}" in first


def test_echo_streams_three_events_in_order_then_the_result(echo):
    import echo as module
    from wflib import StopEvent

    lines = run_task(echo.port, task("t-echo", {"message": "hi"}))
    assert [line["type"] for line in lines] == ["event"] * 4 + ["result"]
    for i, line in enumerate(lines[:3], start=1):
        assert line["data"] == expected(module.Progress(step=i, message="hi"))
        assert line["data"]["__is_pydantic"] is True
        assert line["data"]["value"] == {"step": i, "message": "hi"}
        assert line["data"]["qualified_name"] == "echo.Progress"
    # The stream ends with the workflow's StopEvent, as llama_deploy's events route shows it.
    assert lines[3]["data"]["qualified_name"].endswith(".StopEvent")
    assert lines[3]["data"] == expected(StopEvent(result="Message received: hi"))
    result = lines[4]
    assert result["data"] == "Message received: hi"
    assert isinstance(result["state"], dict)


def test_events_are_streamed_as_they_happen(echo):
    with Conn(echo.port) as conn:
        started = time.monotonic()
        conn.request("POST", "/tasks", task("t-slow", {"message": "slow", "delay": 0.4}))
        status, headers = conn.read_head()
        assert status == 200 and headers["transfer-encoding"] == "chunked"
        first = json.loads(conn.read_chunk())
        first_at = time.monotonic() - started
        rest = []
        while True:
            chunk = conn.read_chunk()
            if not chunk:
                break
            assert chunk.endswith(b"\n") and chunk.count(b"\n") == 1, "one line per chunk"
            rest.append(json.loads(chunk))
        total = time.monotonic() - started
    assert first["data"]["value"]["step"] == 1
    assert rest[-1]["type"] == "result"
    assert first_at < 0.35 < total, (first_at, total)


@pytest.mark.parametrize(
    "kind, data",
    [
        ("dict", {"n": 1, "items": [1, 2.5, "x", None, True]}),
        ("none", None),
        ("number", 42),
        ("model", {"x": 1, "y": 2}),
        ("set", [1, 2]),
    ],
)
def test_results_that_are_not_strings_keep_their_value(serve, kind, data):
    adapter = serve("src/echo:point_workflow" if kind == "model" else "src/echo:object_workflow")
    lines = run_task(adapter.port, task(f"t-{kind}", {"kind": kind}))
    result = lines[-1]
    assert result["type"] == "result"
    if kind == "model":  # a custom StopEvent is the run's result itself
        assert {k: result["data"][k] for k in ("x", "y")} == data
    else:
        assert result["data"] == data


def test_a_result_json_cannot_hold_becomes_text(serve):
    adapter = serve("src/echo:object_workflow")
    lines = run_task(adapter.port, task("t-object", {"kind": "object"}))
    assert lines[-1]["type"] == "result"
    assert lines[-1]["data"].startswith("<object object at")


def test_a_failing_workflow_answers_an_error_line(serve):
    adapter = serve("src/failing:failing_workflow")
    status, _, body = http(adapter.port, "POST", "/tasks", task("t-fail", {"what": "wrong"}))
    assert status == 200
    lines = ndjson(body)
    assert [line["type"] for line in lines] == ["event", "error"]
    assert lines[0]["data"]["value"] == {"note": "about to fail"}
    assert lines[1] == {"type": "error", "message": "ValueError: the input was wrong"}
    # The traceback is in the service's log.
    assert "ValueError: the input was wrong" in adapter.log()


def test_a_workflow_timeout_is_an_error(serve):
    adapter = serve("src/echo:short_timeout")
    lines = run_task(adapter.port, task("t-timeout", {"message": "x", "delay": 0.4}))
    assert lines[-1]["type"] == "error"
    assert lines[-1]["message"].startswith("WorkflowTimeoutError: Operation timed out after 0.5 seconds")
    assert all(line["type"] == "event" for line in lines[:-1])


def test_session_state_carries_a_counter(serve):
    adapter = serve("src/counter:counter")
    one = run_task(adapter.port, task("c1", state=None, session="a"))[-1]
    assert one["type"] == "result" and one["data"] == 1
    two = run_task(adapter.port, task("c2", state=one["state"], session="a"))[-1]
    assert two["data"] == 2
    three = run_task(adapter.port, task("c3", state=two["state"], session="a"))[-1]
    assert three["data"] == 3
    # A new session starts from nothing.
    other = run_task(adapter.port, task("c4", state=None, session="b"))[-1]
    assert other["data"] == 1
    # The state is the Context serialized the way llama_deploy's JsonSerializer does it.
    assert json.loads(json.dumps(two["state"])) == two["state"]


def test_a_state_that_is_not_a_context_is_an_error(serve):
    adapter = serve("src/counter:counter")
    lines = run_task(adapter.port, task("c-bad", state={"state": 5}))
    assert len(lines) == 1 and lines[0]["type"] == "error"
    assert lines[0]["message"].startswith("cannot restore the session state:")


def test_human_in_the_loop(serve):
    from wflib import HumanResponseEvent, InputRequiredEvent

    adapter = serve("src/hitl:hitl_workflow")
    with Conn(adapter.port) as conn:
        conn.request("POST", "/tasks", task("h1", {"question": "Name? "}))
        status, _ = conn.read_head()
        assert status == 200
        asked = json.loads(conn.read_chunk())
        assert asked["type"] == "event"
        assert asked["data"] == expected(InputRequiredEvent(prefix="Name? "))
        assert asked["data"]["qualified_name"].endswith(".InputRequiredEvent")

        answer = expected(HumanResponseEvent(response="Ada"))
        status, _, body = http(adapter.port, "POST", "/tasks/h1/events", {"data": answer})
        assert (status, json.loads(body)) == (200, {})

        rest = []
        while True:
            chunk = conn.read_chunk()
            if not chunk:
                break
            rest.append(json.loads(chunk))
    assert [line["type"] for line in rest] == ["event", "result"]
    assert rest[0]["data"]["qualified_name"].endswith(".StopEvent")
    assert rest[1]["data"] == "Hello, Ada!"


def test_human_in_the_loop_with_the_event_as_a_string(serve):
    from wflib import HumanResponseEvent

    adapter = serve("src/hitl:hitl_workflow")
    with Conn(adapter.port) as conn:
        conn.request("POST", "/tasks", task("h2"))
        assert conn.read_head()[0] == 200
        assert json.loads(conn.read_chunk())["data"]["qualified_name"].endswith(".InputRequiredEvent")
        # llama_deploy's EventDefinition.event_obj_str: the serializer's JSON as a string.
        text = serializer().serialize(HumanResponseEvent(response="Grace"))
        status, _, _ = http(adapter.port, "POST", "/tasks/h2/events", {"data": text})
        assert status == 200
        lines = ndjson(conn.read_body({"transfer-encoding": "chunked"}))
    assert lines[-1] == {"type": "result", "data": "Hello, Grace!", "state": lines[-1]["state"]}


def test_events_for_unknown_tasks_are_404_and_bad_events_400(serve):
    from wflib import HumanResponseEvent

    adapter = serve("src/hitl:hitl_workflow")
    answer = expected(HumanResponseEvent(response="x"))
    status, _, body = http(adapter.port, "POST", "/tasks/nope/events", {"data": answer})
    assert status == 404 and "nope" in json.loads(body)["error"]

    with Conn(adapter.port) as conn:
        conn.request("POST", "/tasks", task("h3"))
        assert conn.read_head()[0] == 200
        conn.read_chunk()
        for bad in ({"data": {"plain": "dict"}}, {"data": 5}, {"nodata": 1}, {"data": "{not json"},
                    {"data": {"__is_pydantic": True, "value": {}, "qualified_name": "no.such.Event"}}):
            status, _, body = http(adapter.port, "POST", "/tasks/h3/events", bad)
            assert status == 400, (bad, body)
            assert json.loads(body)["error"]
        status, _, _ = http(adapter.port, "POST", "/tasks/h3/events", {"data": answer})
        assert status == 200
        lines = ndjson(conn.read_body({"transfer-encoding": "chunked"}))
    assert lines[-1]["data"] == "Hello, x!"
    # Once the task is over, it takes no more events.
    status, _, _ = http(adapter.port, "POST", "/tasks/h3/events", {"data": answer})
    assert status == 404


def test_a_closed_connection_cancels_the_run(serve):
    adapter = serve("src/hitl:hitl_workflow")
    conn = Conn(adapter.port)
    conn.request("POST", "/tasks", task("h4"))
    assert conn.read_head()[0] == 200
    conn.read_chunk()
    conn.close()
    # Not an event: 400 while the task runs, 404 once the adapter has seen deployd go.
    not_an_event = {"data": {"plain": "dict"}}
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        status, _, _ = http(adapter.port, "POST", "/tasks/h4/events", not_an_event)
        if status == 404:
            break
        assert status == 400
        time.sleep(0.1)
    assert status == 404
    assert "task h4 (attempt 1): deployd closed the connection; the run is cancelled" in adapter.log()


def test_a_cancel_request_cancels_the_run_and_ends_its_answer(serve):
    adapter = serve("src/hitl:hitl_workflow")
    # No such task yet: 404.
    status, _, _ = http(adapter.port, "POST", "/tasks/h5/cancel")
    assert status == 404
    conn = Conn(adapter.port)
    conn.request("POST", "/tasks", task("h5"))
    assert conn.read_head()[0] == 200
    conn.read_chunk()  # the question: the run waits for a human
    status, _, _ = http(adapter.port, "POST", "/tasks/h5/cancel")
    assert status == 200
    # The answer ends with an error line that says the run was cancelled.
    lines = ndjson(conn.read_body({"transfer-encoding": "chunked"}))
    assert lines[-1]["type"] == "error"
    assert "cancel" in lines[-1]["message"].lower()
    assert "task h5 (attempt 1): cancelled by deployd" in adapter.log()
    assert "Traceback" not in adapter.log(), "a cancelled run is not a failure"
    # It has ended: neither events nor another cancel find it.
    status, _, _ = http(adapter.port, "POST", "/tasks/h5/cancel")
    assert status == 404
    status, _, _ = http(adapter.port, "GET", "/tasks/h5/cancel")
    assert status == 405


def test_many_concurrent_tasks_over_keep_alive_connections(echo):
    connections, per_connection = 16, 20

    async def worker(n):
        reader, writer = await asyncio.open_connection("127.0.0.1", echo.port)
        try:
            for i in range(per_connection):
                message = f"m-{n}-{i}"
                lines = await async_task(reader, writer, task(f"k-{n}-{i}", {"message": message, "delay": 0.01}))
                assert [line["type"] for line in lines] == ["event"] * 4 + ["result"], lines
                assert [line["data"]["value"]["message"] for line in lines[:3]] == [message] * 3
                assert lines[-1]["data"] == f"Message received: {message}"
            assert not reader.at_eof(), "the connection stays open"
        finally:
            writer.close()

    async def main():
        await asyncio.gather(*(worker(n) for n in range(connections)))

    started = time.monotonic()
    asyncio.run(main())
    elapsed = time.monotonic() - started
    # 320 tasks, each sleeping 30 ms: one at a time that would take ~10 s.
    assert elapsed < 8, elapsed


def test_tasks_run_at_the_same_time(echo):
    async def one(i):
        reader, writer = await asyncio.open_connection("127.0.0.1", echo.port)
        try:
            return await async_task(reader, writer, task(f"p-{i}", {"message": str(i), "delay": 0.3}))
        finally:
            writer.close()

    async def main():
        return await asyncio.gather(*(one(i) for i in range(50)))

    started = time.monotonic()
    results = asyncio.run(main())
    elapsed = time.monotonic() - started
    assert all(r[-1]["data"] == f"Message received: {i}" for i, r in enumerate(results))
    assert elapsed < 5, elapsed  # 50 × 0.9 s one after another would be 45 s


def test_large_inputs_and_events_pass_through(echo):
    message = "x" * (3 * 1024 * 1024)
    lines = run_task(echo.port, task("t-large", {"message": message}))
    assert [line["data"]["value"]["message"] for line in lines[:3]] == [message] * 3
    assert lines[-1]["data"] == f"Message received: {message}"
