"""The HTTP/1.1 server: framing, keep-alive, limits, and clean 4xx answers to malformed requests."""

import json
import socket
import time

import pytest

from helpers import Conn, http, ndjson, spawn, task, wait_healthy


@pytest.fixture(scope="module")
def adapter(serve):
    return serve("src/echo:echo_workflow", args=["--max-body", "4096"])


def raw(port, data, timeout=10.0):
    """Sends bytes, returns everything the server sends until it closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        out = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            out += chunk
    return out


def status_of(response):
    return int(response.split(b" ", 2)[1])


def json_body(response):
    return json.loads(response.split(b"\r\n\r\n", 1)[1])


@pytest.mark.parametrize(
    "request_bytes, status",
    [
        (b"HELLO\r\n\r\n", 400),
        (b"GET /healthz\r\n\r\n", 400),
        (b"GET /healthz HTTP/1.1 extra\r\nHost: x\r\n\r\n", 400),
        (b"G(T /healthz HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET healthz HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET /healthz HTTP/2.0\r\nHost: x\r\n\r\n", 505),
        (b"GET /healthz HTTX/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET /healthz HTTP/1.1\r\n\r\n", 400),  # no Host
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", 400),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n", 400),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Name: 1\r\n\r\n", 400),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\n folded: 1\r\n\r\n", 400),
        (b"POST /tasks HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", 400),
        (b"POST /tasks HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", 400),
        (b"POST /tasks HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
        (b"POST /tasks HTTP/1.1\r\nHost: x\r\nContent-Length: 99999\r\n\r\n", 413),
        (b"POST /tasks HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 501),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n", 431),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-A: 1\r\n" * 150 + b"\r\n", 431),
        (b"POST /tasks HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc", 400),  # cut short
    ],
)
def test_a_malformed_request_gets_a_4xx_json_answer_and_the_connection_closes(adapter, request_bytes, status):
    if request_bytes.endswith(b"abc"):
        # A body cut short by the client closing: nothing to answer, and the server lives on.
        with socket.create_connection(("127.0.0.1", adapter.port)) as sock:
            sock.sendall(request_bytes)
            sock.shutdown(socket.SHUT_WR)
            assert sock.recv(100) == b""
        assert http(adapter.port, "GET", "/healthz")[0] == 200
        return
    response = raw(adapter.port, request_bytes)
    assert status_of(response) == status, response[:300]
    head = response.split(b"\r\n\r\n", 1)[0].lower()
    assert b"content-type: application/json" in head
    assert b"connection: close" in head
    assert json_body(response)["error"]
    assert http(adapter.port, "GET", "/healthz")[0] == 200


@pytest.mark.parametrize(
    "body, message",
    [
        (b"not json", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (json.dumps({"input": {}}).encode(), "task_id"),
        (json.dumps({"task_id": "t", "input": [1]}).encode(), "input"),
        (json.dumps({"task_id": "t", "input": {}, "state": "s"}).encode(), "state"),
        (b"", "empty"),
    ],
)
def test_a_bad_task_body_is_400_and_the_connection_stays_open(adapter, body, message):
    with Conn(adapter.port) as conn:
        conn.request("POST", "/tasks", body)
        status, headers, answer = conn.response()
        assert status == 400
        assert message in json.loads(answer)["error"]
        assert "connection" not in headers
        conn.request("GET", "/healthz")
        assert conn.response()[0] == 200


def test_routes_and_methods(adapter):
    assert http(adapter.port, "GET", "/nope")[0] == 404
    status, headers, _ = http(adapter.port, "GET", "/tasks")
    assert status == 405 and headers["allow"] == "POST"
    status, headers, _ = http(adapter.port, "POST", "/healthz", {})
    assert status == 405 and headers["allow"] == "GET, HEAD"
    assert http(adapter.port, "GET", "/tasks/x/events")[0] == 405
    status, headers, body = http(adapter.port, "GET", "/healthz?probe=1")
    assert status == 200 and json.loads(body) == {"status": "ok"}
    with Conn(adapter.port) as conn:
        conn.request("HEAD", "/healthz")
        status, headers = conn.read_head()
        assert status == 200 and int(headers["content-length"]) > 0
        conn.request("GET", "/healthz")  # nothing of the HEAD body in between
        assert conn.response()[0] == 200


def test_keep_alive_many_requests_on_one_connection(adapter):
    with Conn(adapter.port) as conn:
        for i in range(20):
            conn.request("POST", "/tasks", task(f"ka-{i}", {"message": str(i)}))
            status, headers, body = conn.response()
            assert status == 200 and headers["transfer-encoding"] == "chunked"
            assert ndjson(body)[-1]["data"] == f"Message received: {i}"
            conn.request("GET", "/healthz")
            assert conn.response()[0] == 200


def test_pipelined_requests_are_answered_in_order(adapter):
    body = json.dumps(task("pipe", {"message": "p"})).encode()
    post = b"POST /tasks HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    get = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    close = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    with Conn(adapter.port) as conn:
        conn.send(get + post + get + close)
        assert conn.response()[0] == 200
        status, _, answer = conn.response()
        assert status == 200 and ndjson(answer)[-1]["data"] == "Message received: p"
        assert conn.response()[0] == 200
        status, headers, _ = conn.response()
        assert status == 200 and headers["connection"] == "close"
        assert conn.is_closed()


def test_connection_close_is_honoured(adapter):
    with Conn(adapter.port) as conn:
        conn.request("POST", "/tasks", task("cc", {"message": "c"}), headers={"Connection": "close"})
        status, headers, body = conn.response()
        assert status == 200 and headers["connection"] == "close"
        assert ndjson(body)[-1]["type"] == "result"
        assert conn.is_closed()


def test_http_1_0_gets_the_stream_until_the_connection_closes(adapter):
    body = json.dumps(task("old", {"message": "1.0"})).encode()
    response = raw(
        adapter.port, b"POST /tasks HTTP/1.0\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    head, _, payload = response.partition(b"\r\n\r\n")
    assert status_of(head) == 200
    assert b"transfer-encoding" not in head.lower()
    assert ndjson(payload)[-1]["data"] == "Message received: 1.0"
    # HTTP/1.0 with keep-alive, for a plain JSON answer.
    with Conn(adapter.port) as conn:
        conn.send(b"GET /healthz HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        status, headers, _ = conn.response()
        assert status == 200 and headers["connection"] == "keep-alive"
        conn.send(b"GET /healthz HTTP/1.0\r\n\r\n")
        assert conn.response()[0] == 200
        assert conn.is_closed()


def test_expect_100_continue(adapter):
    body = json.dumps(task("expect", {"message": "e"})).encode()
    with Conn(adapter.port) as conn:
        conn.send(
            b"POST /tasks HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n"
            % len(body)
        )
        status, _ = conn.read_head()
        assert status == 100
        conn.send(body)
        status, _, answer = conn.response()
        assert status == 200 and ndjson(answer)[-1]["data"] == "Message received: e"


def test_a_body_at_the_limit_is_taken(adapter):
    message = "x" * (4096 - len(json.dumps(task("big", {"message": ""}))))
    body = json.dumps(task("big", {"message": message})).encode()
    assert len(body) == 4096
    status, _, answer = http(adapter.port, "POST", "/tasks", body)
    assert status == 200 and ndjson(answer)[-1]["data"] == f"Message received: {message}"


def test_a_utf8_message_round_trips(adapter):
    status, _, answer = http(adapter.port, "POST", "/tasks", task("u", {"message": "héllo ✓ 日本"}))
    assert status == 200 and ndjson(answer)[-1]["data"] == "Message received: héllo ✓ 日本"


def test_an_idle_keep_alive_connection_does_not_hold_up_the_others(adapter):
    idle = socket.create_connection(("127.0.0.1", adapter.port))
    half = socket.create_connection(("127.0.0.1", adapter.port))
    half.sendall(b"GET /healthz HTTP/1.1\r\nHo")  # a request that never ends
    try:
        started = time.monotonic()
        assert http(adapter.port, "GET", "/healthz")[0] == 200
        assert time.monotonic() - started < 1
    finally:
        idle.close()
        half.close()
