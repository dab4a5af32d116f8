"""A small HTTP/1.1 server on asyncio streams, serving deployd's service protocol.

- keep-alive (HTTP/1.1 by default, HTTP/1.0 with `Connection: keep-alive`), requests of one
  connection answered in order, any number of connections at once;
- request bodies by `Content-Length` (a `Transfer-Encoding` in a request is answered 501), with
  a size limit (413) and `Expect: 100-continue`;
- streamed answers with `Transfer-Encoding: chunked`, one NDJSON line per chunk (HTTP/1.0: the
  body ends when the connection closes);
- a malformed request gets a 4xx JSON answer `{"error": "..."}` and the connection is closed;
- as one of several workers (see `app.py`), an event for a task this worker does not run is
  passed to the other workers' Unix sockets, and the answer of the one that runs it is returned.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union
from urllib.parse import unquote

from .runner import BadRequest, ClientGone, Runner, dumps, log

MAX_HEAD = 64 * 1024  # request line and headers
MAX_HEADERS = 100
HEAD_TIMEOUT = 30.0  # from the first byte of a request to the end of its headers
BODY_TIMEOUT = 60.0
DEFAULT_IDLE_TIMEOUT = 120.0  # a keep-alive connection with no request
DEFAULT_MAX_BODY = 64 * 1024 * 1024

REASONS = {
    100: "Continue",
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    411: "Length Required",
    413: "Content Too Large",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}

TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
TARGET = re.compile(rb"^[\x21-\x7e]+$")
EVENTS_PATH = re.compile(r"^/tasks/([^/]+)/events/?$")
CANCEL_PATH = re.compile(r"^/tasks/([^/]+)/cancel/?$")
# Marks an event passed on by another worker, which is not passed on again.
FORWARDED = "x-deployd-adapter-forwarded"
# The longest the sweeper (see `_Watch`) waits between two looks at the connections: a running
# task whose connection deployd has closed is cancelled within about this long.
POLL_SECONDS = 1.0
# What a request that stalled in a phase (see `_Watch`) is answered with 408.
TIMED_OUT = {
    "head": "the request headers did not come in time",
    "body": "the request body did not come in time",
}
# How long the head of a task's answer may wait for the first line of its body.
HEAD_DELAY = 0.005
# How long a worker waits for the others to answer a passed-on event.
FORWARD_TIMEOUT = 10.0


class _Watch:
    """What the server's sweeper knows of one connection: the wait it is in (`phase`: "idle"
    for a request line, "head", "body", "task" while a task runs, "" while answering) and until
    when that wait may last. Time limits cost a request no timer of its own: one sweeper per
    server looks at every connection a few times per limit and cancels the connection's task when
    a wait has lasted too long, or when deployd has closed the connection of a running task;
    `expired` then names the phase it ended."""

    __slots__ = ("phase", "until", "what", "expired", "task", "reader", "writer", "_loop")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.phase = ""
        self.until: Optional[float] = None
        self.what = ""
        self.expired = ""
        self.task = asyncio.current_task()
        self.reader = reader
        self.writer = writer
        self._loop = asyncio.get_running_loop()

    async def within(self, awaitable: Any, seconds: float, phase: str) -> Any:
        self.phase = phase
        self.until = self._loop.time() + seconds
        return await awaitable

    def enter(self, phase: str, what: str = "") -> None:
        """A wait without a time limit: answering (""), or running a task ("task")."""
        self.phase = phase
        self.until = None
        self.what = what

    @property
    def busy(self) -> bool:
        return self.phase in ("", "task")


class HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Request:
    __slots__ = ("method", "path", "version", "headers", "body", "keep_alive")

    def __init__(self, method: str, path: str, version: str, headers: Dict[str, str]) -> None:
        self.method = method
        self.path = path
        self.version = version
        self.headers = headers
        self.body = b""
        self.keep_alive = False


def _connection_tokens(headers: Dict[str, str]) -> List[str]:
    return [t.strip().lower() for t in headers.get("connection", "").split(",") if t.strip()]


class Server:
    def __init__(
        self,
        runner: Runner,
        *,
        max_body: int = DEFAULT_MAX_BODY,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        peers: Sequence[str] = (),
    ) -> None:
        self.runner = runner
        self.max_body = max_body
        self.idle_timeout = idle_timeout
        self.peers = list(peers)  # the other workers' Unix socket addresses
        self.connections: Dict[asyncio.StreamWriter, _Watch] = {}
        self.closing = False
        self._servers: List[asyncio.base_events.Server] = []
        self._sweeper: Optional[asyncio.Task] = None

    def _start_sweeper(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.ensure_future(self._sweep())

    async def _sweep(self) -> None:
        """Ends the waits that have lasted too long, and the tasks deployd has stopped waiting
        for (see `_Watch`)."""
        every = max(0.01, min(self.idle_timeout, HEAD_TIMEOUT, BODY_TIMEOUT, POLL_SECONDS) / 4)
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(every)
            now = loop.time()
            for watch in list(self.connections.values()):
                if watch.expired or watch.task is None:
                    continue
                if watch.phase == "task":
                    ended = watch.reader.at_eof() or watch.writer.is_closing()
                else:
                    ended = watch.until is not None and now >= watch.until
                if ended:
                    watch.expired = watch.phase
                    watch.task.cancel()

    async def start(self, host: str, port: int) -> None:
        self._servers.append(
            await asyncio.start_server(
                self._connection, host, port, limit=MAX_HEAD, backlog=1024, reuse_address=True
            )
        )

    async def start_on(self, sock: Any, me: Optional[str] = None) -> None:
        """Serves on a listening socket that is already bound (a worker's shared socket), and on
        the Unix socket `me`, where the other workers pass events on."""
        self._servers.append(
            await asyncio.start_server(self._connection, sock=sock, limit=MAX_HEAD, backlog=1024)
        )
        if me is not None:
            # The socket is made here, not by the event loop from the path: uvloop does not
            # take Linux's abstract names ("\0...") as paths.
            unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                unix.bind(me)
                unix.listen(128)
                unix.setblocking(False)
            except OSError:
                unix.close()
                raise
            self._servers.append(
                await asyncio.start_unix_server(self._connection, sock=unix, limit=MAX_HEAD)
            )

    async def shutdown(self, grace: float) -> None:
        """Stops listening, closes idle connections, gives running tasks `grace` seconds to end,
        then cancels them."""
        self.closing = True
        for server in self._servers:
            server.close()
        for writer, watch in list(self.connections.items()):
            if not watch.busy:
                writer.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self.runner.running and loop.time() < deadline:
            await asyncio.sleep(0.05)
        await self.runner.cancel_all()
        for writer in list(self.connections):
            writer.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    # -- one connection ---------------------------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        watch = _Watch(reader, writer)
        self.connections[writer] = watch
        self._start_sweeper()
        sock = writer.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # asyncio sets TCP_NODELAY only on sockets made with IPPROTO_TCP, which a shared
            # socket made by `socket.create_server` is not; without it every answer written in
            # two parts waits for the client's delayed ACK (40 ms).
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        try:
            try:
                while not self.closing:
                    try:
                        request = await self._read_request(reader, writer, watch)
                    except HttpError as err:
                        watch.enter("")
                        await self._send_json(writer, err.status, {"error": err.message}, keep_alive=False)
                        break
                    if request is None:
                        break
                    watch.enter("")
                    keep = await self._dispatch(request, reader, writer, watch)
                    watch.enter("")
                    if not keep or self.closing:
                        break
            except asyncio.CancelledError:
                expired = watch.expired
                if not expired:
                    raise
                uncancel = getattr(watch.task, "uncancel", None)
                if uncancel is not None:
                    uncancel()
                # An idle connection is closed without a word; a request that stalled gets 408.
                if expired in TIMED_OUT:
                    watch.enter("")
                    await self._send_json(writer, 408, {"error": TIMED_OUT[expired]}, keep_alive=False)
                elif expired == "task":
                    log(f"{watch.what}: deployd closed the connection; the run is cancelled")
        except (ConnectionError, ClientGone, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug here must not take the server down
            log(f"connection error: {type(exc).__name__}: {exc}")
        finally:
            self.connections.pop(writer, None)
            writer.close()

    async def _read_line(self, reader: asyncio.StreamReader) -> bytes:
        try:
            return await reader.readuntil(b"\n")
        except asyncio.LimitOverrunError:
            raise HttpError(431, "the request line or a header is too long") from None

    async def _read_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, watch: _Watch
    ) -> Optional[Request]:
        # The request line: wait as long as an idle connection is kept. Empty lines before it are
        # skipped (RFC 9112 2.2).
        line = b""
        for _ in range(8):
            try:
                line = await watch.within(self._read_line(reader), self.idle_timeout, "idle")
            except asyncio.IncompleteReadError as err:
                if err.partial.strip():
                    raise HttpError(400, "the request ended before its headers") from None
                return None
            if line.strip():
                break
        else:
            raise HttpError(400, "no request line")
        try:
            head = await watch.within(
                self._read_headers(reader, len(line)), HEAD_TIMEOUT, "head"
            )
        except asyncio.IncompleteReadError:
            raise HttpError(400, "the request ended before its headers") from None
        request = self._parse(line, head)

        # The body.
        if "transfer-encoding" in request.headers:
            raise HttpError(501, "a Transfer-Encoding in a request is not supported; send Content-Length")
        length = 0
        raw_length = request.headers.get("content-length")
        if raw_length is not None:
            values = {v.strip() for v in raw_length.split(",")}
            if len(values) != 1 or not next(iter(values)).isdigit() or len(next(iter(values))) > 18:
                raise HttpError(400, "invalid Content-Length")
            length = int(next(iter(values)))
        if length > self.max_body:
            raise HttpError(413, f"the body is larger than {self.max_body} bytes")
        if length:
            if request.version == "HTTP/1.1" and request.headers.get("expect", "").lower() == "100-continue":
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                await writer.drain()
            try:
                request.body = await watch.within(reader.readexactly(length), BODY_TIMEOUT, "body")
            except asyncio.IncompleteReadError:
                return None  # the client went away in the middle of its body
        tokens = _connection_tokens(request.headers)
        if request.version == "HTTP/1.1":
            request.keep_alive = "close" not in tokens
        else:
            request.keep_alive = "keep-alive" in tokens
        return request

    async def _read_headers(self, reader: asyncio.StreamReader, used: int) -> List[bytes]:
        lines: List[bytes] = []
        size = used
        while True:
            line = await self._read_line(reader)
            size += len(line)
            if size > MAX_HEAD:
                raise HttpError(431, "the request headers are too large")
            if line in (b"\r\n", b"\n"):
                return lines
            lines.append(line)
            if len(lines) > MAX_HEADERS:
                raise HttpError(431, "too many request headers")

    @staticmethod
    def _parse(line: bytes, head: List[bytes]) -> Request:
        parts = line.rstrip(b"\r\n").split(b" ")
        if len(parts) != 3:
            raise HttpError(400, "malformed request line")
        method, target, version = parts
        if not TOKEN.match(method):
            raise HttpError(400, "malformed method")
        if not TARGET.match(target):
            raise HttpError(400, "malformed request target")
        if version not in (b"HTTP/1.1", b"HTTP/1.0"):
            if re.match(rb"^HTTP/[0-9]\.[0-9]$", version):
                raise HttpError(505, "only HTTP/1.0 and HTTP/1.1 are served")
            raise HttpError(400, "malformed HTTP version")
        headers: Dict[str, str] = {}
        for raw in head:
            raw = raw.rstrip(b"\r\n")
            if raw[:1] in (b" ", b"\t"):
                raise HttpError(400, "folded header lines are not accepted")
            name, sep, value = raw.partition(b":")
            if not sep or not TOKEN.match(name):
                raise HttpError(400, "malformed header line")
            if b"\r" in value or b"\x00" in value:
                raise HttpError(400, "malformed header value")
            key = name.decode("ascii").lower()
            text = value.strip(b" \t").decode("latin-1")
            if key in headers:
                if key == "host":
                    raise HttpError(400, "more than one Host header")
                headers[key] = headers[key] + ", " + text
            else:
                headers[key] = text
        version_text = version.decode("ascii")
        if version_text == "HTTP/1.1" and "host" not in headers:
            raise HttpError(400, "an HTTP/1.1 request needs a Host header")
        target_text = target.decode("ascii")
        if target_text.startswith(("http://", "https://")):  # absolute-form
            after = target_text.split("://", 1)[1]
            slash = after.find("/")
            target_text = after[slash:] if slash >= 0 else "/"
        elif not target_text.startswith("/"):
            raise HttpError(400, "the request target must be a path")
        path = target_text.split("?", 1)[0].split("#", 1)[0]
        return Request(method.decode("ascii"), path, version_text, headers)

    # -- answers ----------------------------------------------------------------------------

    @staticmethod
    def _head(status: int, headers: List[Tuple[str, str]]) -> bytes:
        lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}"]
        lines += [f"{k}: {v}" for k, v in headers]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    @staticmethod
    def _connection_header(request: Optional[Request], keep_alive: bool) -> List[Tuple[str, str]]:
        if not keep_alive:
            return [("Connection", "close")]
        if request is not None and request.version == "HTTP/1.0":
            return [("Connection", "keep-alive")]
        return []

    async def _send_json(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        obj: Any,
        *,
        keep_alive: bool,
        request: Optional[Request] = None,
        extra: Optional[List[Tuple[str, str]]] = None,
    ) -> None:
        body = (dumps(obj) + "\n").encode("utf-8") if obj is not None else b""
        headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        headers += self._connection_header(request, keep_alive)
        headers += extra or []
        head = self._head(status, headers)
        if request is not None and request.method == "HEAD":
            body = b""
        writer.write(head + body)
        await writer.drain()

    async def _dispatch(
        self,
        request: Request,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        watch: _Watch,
    ) -> bool:
        """Answers one request; returns whether the connection stays open."""
        keep = request.keep_alive and not self.closing
        path, method = request.path, request.method

        if path in ("/healthz", "/healthz/"):
            if method not in ("GET", "HEAD"):
                return await self._not_allowed(writer, request, keep, "GET, HEAD")
            await self._send_json(writer, 200, {"status": "ok"}, keep_alive=keep, request=request)
            return keep

        if path in ("/tasks", "/tasks/"):
            if method != "POST":
                return await self._not_allowed(writer, request, keep, "POST")
            return await self._post_task(request, writer, keep, watch)

        match = EVENTS_PATH.match(path)
        if match:
            if method != "POST":
                return await self._not_allowed(writer, request, keep, "POST")
            return await self._post_event(unquote(match.group(1)), request, writer, keep)

        match = CANCEL_PATH.match(path)
        if match:
            if method != "POST":
                return await self._not_allowed(writer, request, keep, "POST")
            return await self._post_cancel(unquote(match.group(1)), request, writer, keep)

        await self._send_json(
            writer, 404, {"error": f"no route {method} {path}"}, keep_alive=keep, request=request
        )
        return keep

    async def _not_allowed(
        self, writer: asyncio.StreamWriter, request: Request, keep: bool, allow: str
    ) -> bool:
        await self._send_json(
            writer,
            405,
            {"error": f"{request.method} is not allowed on {request.path}"},
            keep_alive=keep,
            request=request,
            extra=[("Allow", allow)],
        )
        return keep

    @staticmethod
    def _json_body(request: Request) -> Any:
        if not request.body:
            raise BadRequest("the body must be a JSON object, and it is empty")
        try:
            return json.loads(request.body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise BadRequest(f"the body is not valid JSON: {exc}") from None

    async def _post_task(
        self, request: Request, writer: asyncio.StreamWriter, keep: bool, watch: _Watch
    ) -> bool:
        try:
            task_id, attempt, run_input, state = self.runner.parse_task(self._json_body(request))
        except BadRequest as err:
            await self._send_json(writer, 400, {"error": str(err)}, keep_alive=keep, request=request)
            return keep

        chunked = request.version == "HTTP/1.1"
        keep = keep and chunked  # an HTTP/1.0 body ends when the connection closes
        headers = [("Content-Type", "application/x-ndjson"), ("Cache-Control", "no-store")]
        if chunked:
            headers.append(("Transfer-Encoding", "chunked"))
        headers += self._connection_header(request, keep)
        # The head goes out with the first event, or with the whole answer when the run ends
        # first: a short task is answered in one write (one wake-up of deployd, not two). A run
        # that says nothing for HEAD_DELAY gets its head written then, so that deployd knows the
        # task was taken.
        head: Optional[bytes] = self._head(200, headers)

        def flush_head() -> None:
            nonlocal head
            if head is not None:
                data, head = head, None
                if not writer.is_closing():
                    writer.write(data)

        timer = asyncio.get_running_loop().call_later(HEAD_DELAY, flush_head)

        def frame(data: bytes) -> bytes:
            return b"%x\r\n%s\r\n" % (len(data), data) if chunked else data

        # Events are written as they come; the lines that end the answer (the closing StopEvent
        # and the outcome) are held and written in one go with the end of the body.
        held = bytearray()

        async def emit(line: Union[Dict[str, Any], str], hold: bool = False) -> None:
            nonlocal head
            if isinstance(line, str):
                data = frame((line + "\n").encode("utf-8"))
            else:
                data = frame((dumps(line) + "\n").encode("utf-8"))
                hold = hold or line.get("type") != "event"
            if hold:
                held.extend(data)
                return
            if writer.is_closing():
                raise ClientGone()
            if head is not None:
                data, head = head + data, None
            try:
                writer.write(data)
                await writer.drain()
            except (ConnectionError, RuntimeError) as exc:
                raise ClientGone() from exc

        try:
            # The sweeper cancels the run if deployd closes the connection meanwhile.
            watch.enter("task", f"task {task_id} (attempt {attempt})")
            await self.runner.run(task_id, attempt, run_input, state, emit)
        except ClientGone:
            log(f"task {task_id} (attempt {attempt}): deployd closed the connection; the run is cancelled")
            return False
        finally:
            timer.cancel()
        if chunked:
            held.extend(b"0\r\n\r\n")
        if head is not None:
            held[:0] = head
            head = None
        try:
            writer.write(bytes(held))
            await writer.drain()
        except (ConnectionError, RuntimeError):
            return False
        return keep

    async def _post_event(
        self, task_id: str, request: Request, writer: asyncio.StreamWriter, keep: bool
    ) -> bool:
        try:
            body = self._json_body(request)
            if not isinstance(body, dict) or "data" not in body:
                raise BadRequest('the body must be {"data": <serialized event>}')
            delivered = self.runner.send_event(task_id, body["data"])
        except BadRequest as err:
            await self._send_json(writer, 400, {"error": str(err)}, keep_alive=keep, request=request)
            return keep
        if not delivered and await self._answered_by_peer(request, writer, keep):
            return keep
        if not delivered:
            await self._send_json(
                writer, 404, {"error": f"no running task {task_id!r}"}, keep_alive=keep, request=request
            )
            return keep
        await self._send_json(writer, 200, {}, keep_alive=keep, request=request)
        return keep

    async def _post_cancel(
        self, task_id: str, request: Request, writer: asyncio.StreamWriter, keep: bool
    ) -> bool:
        cancelled = self.runner.cancel(task_id)
        if not cancelled and await self._answered_by_peer(request, writer, keep):
            return keep
        if not cancelled:
            await self._send_json(
                writer, 404, {"error": f"no running task {task_id!r}"}, keep_alive=keep, request=request
            )
            return keep
        await self._send_json(writer, 200, {}, keep_alive=keep, request=request)
        return keep

    async def _answered_by_peer(
        self, request: Request, writer: asyncio.StreamWriter, keep: bool
    ) -> bool:
        """Passes a request about a task that does not run here to the other workers; True once
        the one that runs it answered (its answer is sent on)."""
        if not self.peers or FORWARDED in request.headers:
            return False
        answer = await self._forward(request)
        if answer is None:
            return False
        status, payload = answer
        head = self._head(
            status,
            [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))]
            + self._connection_header(request, keep),
        )
        writer.write(head + payload)
        await writer.drain()
        return True

    async def _forward(self, request: Request) -> Optional[Tuple[int, bytes]]:
        """Passes an event to every other worker; the answer of the one that runs the task (any
        answer but 404), or None when none does."""
        data = (
            f"POST {request.path} HTTP/1.1\r\nHost: deployd-adapter\r\n{FORWARDED}: 1\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(request.body)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode("latin-1") + request.body

        async def ask(peer: str) -> Optional[Tuple[int, bytes]]:
            # Connected here, not by the event loop from the path (see `start_on`).
            unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            unix.setblocking(False)
            try:
                await asyncio.wait_for(
                    asyncio.get_running_loop().sock_connect(unix, peer), FORWARD_TIMEOUT
                )
                reader, writer = await asyncio.open_unix_connection(sock=unix)
            except (OSError, asyncio.TimeoutError):
                unix.close()
                return None  # that worker is gone or stopping
            try:
                writer.write(data)
                raw = await asyncio.wait_for(reader.read(), FORWARD_TIMEOUT)
            except (OSError, asyncio.TimeoutError):
                return None
            finally:
                writer.close()
            head, _, payload = raw.partition(b"\r\n\r\n")
            parts = head.split(b" ", 2)
            if len(parts) < 2 or not parts[1].isdigit():
                return None
            return int(parts[1]), payload

        answers = await asyncio.gather(*(ask(peer) for peer in self.peers))
        for answer in answers:
            if answer is not None and answer[0] != 404:
                return answer
        return None
