"""Running tasks of one workflow: events out, human-in-the-loop events in, session context kept."""

from __future__ import annotations

import asyncio
import json
import math
import sys
import traceback
from typing import Any, Awaitable, Callable, Dict, Optional

from .loader import Loaded

# Writes one line of the answer: a dict, or a line already encoded as JSON text (an event line,
# or with `hold=True` the outcome); `hold=True` lets the server keep it for its last write.
Emit = Callable[..., Awaitable[None]]

# How long, once the run is over, events already queued on its stream may take to come out.
DRAIN_SECONDS = 0.05


class BadRequest(Exception):
    """The request is not what the protocol says: answered with 400 and this message."""


class ClientGone(Exception):
    """deployd closed the connection: the run is cancelled."""


def log(message: str) -> None:
    sys.stderr.write(f"deployd_adapter: {message}\n")
    sys.stderr.flush()


def dumps(value: Any) -> str:
    """Compact JSON for the wire. NaN and infinities (which JSON has not) become null."""
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except ValueError:
        return json.dumps(
            _finite(value), ensure_ascii=False, separators=(",", ":"), allow_nan=False
        )


def _strict(value: Any) -> str:
    """Compact JSON for the wire; raises TypeError or ValueError when JSON cannot hold it."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def jsonable(value: Any) -> Any:
    """The result of a run as JSON: itself when JSON can hold it (what llama_deploy 0.9's
    `tasks/run` returns), a pydantic model (a custom `StopEvent` is returned whole) as its
    `model_dump(mode="json")`, anything else as `str()`."""
    try:
        json.dumps(value, allow_nan=False)
        return value
    except (TypeError, ValueError):
        pass
    return _jsonable(value)


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        try:
            return _jsonable(dump(mode="json"))
        except Exception:
            pass
    return str(value)


def describe(exc: BaseException) -> str:
    """`"<ExceptionType>: <message>"` of what the workflow raised. A step's exception that the
    library wrapped (`WorkflowRuntimeError: Error in step 'x': ...`, llama-index-workflows 1.x and
    llama-index-core) is unwrapped to the step's own exception."""
    seen = 0
    while (
        type(exc).__name__ == "WorkflowRuntimeError"
        and exc.__cause__ is not None
        and str(exc).startswith("Error in step")
        and seen < 10
    ):
        exc = exc.__cause__
        seen += 1
    message = str(exc)
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


class Running:
    __slots__ = ("task_id", "attempt", "handler", "done", "cancelled")

    def __init__(self, task_id: str, attempt: Any, handler: Any, done: asyncio.Future) -> None:
        self.task_id = task_id
        self.attempt = attempt
        self.handler = handler
        self.done = done
        self.cancelled = False  # deployd asked (POST /tasks/{id}/cancel)


def _retrieve(fut: asyncio.Future) -> None:
    # Consumes the outcome of a run nobody awaits any more, so asyncio does not log it as lost.
    if not fut.cancelled():
        fut.exception()


class Runner:
    """Runs the tasks of one loaded workflow; any number at once, in one event loop."""

    def __init__(self, loaded: Loaded) -> None:
        self.loaded = loaded
        self.workflow = loaded.workflow
        self.flavor = loaded.flavor
        self.running: dict[str, Running] = {}
        self._background: set[asyncio.Task] = set()

    # -- tasks ------------------------------------------------------------------------------

    @staticmethod
    def parse_task(body: Any) -> tuple[str, Any, dict, Optional[dict]]:
        """Checks a `POST /tasks` body: `(task_id, attempt, input, state)` or `BadRequest`."""
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        task_id = body.get("task_id")
        if not isinstance(task_id, str) or not task_id:
            raise BadRequest("`task_id` must be a non-empty string")
        run_input = body.get("input")
        if run_input is None:
            run_input = {}
        if not isinstance(run_input, dict):
            raise BadRequest("`input` must be a JSON object (the keyword arguments of the run)")
        state = body.get("state")
        if state is not None and not isinstance(state, dict):
            raise BadRequest("`state` must be null or a JSON object (a serialized Context)")
        return task_id, body.get("attempt"), run_input, state

    async def run(
        self,
        task_id: str,
        attempt: Any,
        run_input: dict,
        state: Optional[dict],
        emit: Emit,
    ) -> None:
        """Runs one task, handing every line of the answer to `emit`.

        `emit` raises `ClientGone` when deployd has gone, which cancels the run; so does
        cancelling the task that awaits this (the server does when deployd closes the
        connection while the run says nothing).
        """
        flavor = self.flavor
        serializer = flavor.JsonSerializer()
        try:
            kwargs = dict(run_input)
            if state is not None:
                try:
                    kwargs["ctx"] = flavor.Context.from_dict(
                        self.workflow, state, serializer=serializer
                    )
                except Exception as exc:
                    log(f"task {task_id}: cannot restore the session state")
                    traceback.print_exception(type(exc), exc, exc.__traceback__)
                    await emit(
                        {
                            "type": "error",
                            "message": f"cannot restore the session state: {describe(exc)}",
                        }
                    )
                    return
            handler = self.workflow.run(**kwargs)
        except ClientGone:
            raise
        except Exception as exc:
            log(f"task {task_id} (attempt {attempt}) failed to start: {describe(exc)}")
            traceback.print_exception(type(exc), exc, exc.__traceback__)
            await emit({"type": "error", "message": describe(exc)})
            return

        done = handler if isinstance(handler, asyncio.Future) else asyncio.ensure_future(handler)
        entry = Running(task_id, attempt, handler, done)
        previous = self.running.get(task_id)
        if previous is not None:
            # A newer attempt of a task that still runs here: the newer one takes its place.
            log(f"task {task_id}: attempt {attempt} replaces attempt {previous.attempt}")
            self._cancel(previous)
        self.running[task_id] = entry
        finished = False
        try:
            await self._stream(entry, serializer, emit)
            finished = True
        finally:
            if self.running.get(task_id) is entry:
                del self.running[task_id]
            if not finished:
                self._cancel(entry)

    async def _stream(self, entry: Running, serializer: Any, emit: Emit) -> None:
        flavor = self.flavor
        handler, done = entry.handler, entry.done
        stream = handler.stream_events().__aiter__()
        following: Optional[asyncio.Future] = None
        terminal = None  # the StopEvent that ends the stream: sent only if the run succeeded
        try:
            while True:
                if following is None:
                    following = asyncio.ensure_future(stream.__anext__())
                if done.done():
                    # The run is over: take what is already on the stream, then stop.
                    if not following.done():
                        await asyncio.wait({following}, timeout=DRAIN_SECONDS)
                        if not following.done():
                            break
                elif not following.done():
                    await asyncio.wait({following, done}, return_when=asyncio.FIRST_COMPLETED)
                    if not following.done():
                        continue
                try:
                    event = following.result()
                except StopAsyncIteration:
                    following = None
                    break
                except Exception as exc:
                    # The stream broke; how the run ends is told by its outcome.
                    following = None
                    log(f"task {entry.task_id}: the event stream broke: {describe(exc)}")
                    break
                following = None
                if isinstance(event, flavor.StopEvent):
                    terminal = event
                    break
                await emit(self.event_line(event, serializer))
        finally:
            if following is not None and not following.done():
                following.cancel()

        if not done.done():
            await asyncio.wait({done})
        try:
            result = done.result()
        except asyncio.CancelledError:
            await emit({"type": "error", "message": "CancelledError: the run was cancelled"})
            return
        except Exception as exc:
            if entry.cancelled:
                # The library's own "cancelled" error (WorkflowCancelledByUser): no traceback.
                log(f"task {entry.task_id} (attempt {entry.attempt}): the run ended cancelled")
                await emit({"type": "error", "message": f"cancelled: {describe(exc)}"})
                return
            log(f"task {entry.task_id} (attempt {entry.attempt}) failed: {describe(exc)}")
            traceback.print_exception(type(exc), exc, exc.__traceback__)
            await emit({"type": "error", "message": describe(exc)})
            return

        if terminal is not None:
            await emit(self.event_line(terminal, serializer), hold=True)
        await emit(self.result_line(result, entry, serializer), hold=True)

    def event_line(self, event: Any, serializer: Any) -> str:
        """The answer's line for an event, as JSON text. The serializer's JSON is put in the line
        as it is, without parsing and encoding it again, when it is plain JSON on one line."""
        try:
            text = serializer.serialize(event)
        except Exception:
            text = None
        if (
            isinstance(text, str)
            and text.startswith("{")
            and "\n" not in text
            and "NaN" not in text
            and "Infinity" not in text
        ):
            return '{"type":"event","data":' + text + "}"
        return dumps({"type": "event", "data": self.event_data(event, serializer)})

    def result_line(self, result: Any, entry: Running, serializer: Any) -> str:
        """The answer's last line, as JSON text: the run's result and its Context. Encoded once
        when JSON can hold both as they are; otherwise the result is made JSON (`jsonable`) and a
        Context that cannot be serialized is left out, with a warning."""
        try:
            return _strict(
                {"type": "result", "data": result, "state": self.state_of(entry, serializer, check=False)}
            )
        except (TypeError, ValueError):
            pass
        return dumps(
            {"type": "result", "data": jsonable(result), "state": self.state_of(entry, serializer)}
        )

    def event_data(self, event: Any, serializer: Any) -> Any:
        """An event as llama_deploy 0.9 streams it: `json.loads(JsonSerializer().serialize(ev))`."""
        try:
            return json.loads(serializer.serialize(event))
        except Exception as exc:
            log(f"an event of type {type(event).__name__} cannot be serialized ({exc}); sent as text")
            cls = type(event)
            return {
                "__is_pydantic": True,
                "value": _jsonable(event),
                "qualified_name": f"{cls.__module__}.{cls.__name__}",
            }

    def state_of(self, entry: Running, serializer: Any, check: bool = True) -> Optional[dict]:
        """The run's Context as `ctx.to_dict(serializer=JsonSerializer())`, or None (with a
        warning) when something in it cannot be serialized (with `check=False`, what JSON cannot
        hold is left for the caller to find)."""
        ctx = getattr(entry.handler, "ctx", None)
        if ctx is None:
            return None
        try:
            state = ctx.to_dict(serializer=serializer)
            if check:
                json.dumps(state, allow_nan=False)
            return state
        except Exception as exc:
            log(
                f"task {entry.task_id}: the session state cannot be serialized, so it is not kept "
                f"({describe(exc)})"
            )
            return None

    def _cancel(self, entry: Running) -> None:
        entry.done.add_done_callback(_retrieve)
        if entry.done.done():
            return
        cancel_run = getattr(entry.handler, "cancel_run", None)
        if cancel_run is None:
            entry.done.cancel()
            return

        async def cancel() -> None:
            try:
                await cancel_run()
            except Exception:
                pass

        task = asyncio.ensure_future(cancel())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- human in the loop ------------------------------------------------------------------

    def send_event(self, task_id: str, data: Any) -> bool:
        """Delivers an event to a running task. False when no such task runs; `BadRequest` when
        `data` is not an event."""
        entry = self.running.get(task_id)
        if entry is None:
            return False
        flavor = self.flavor
        if isinstance(data, dict):
            if "qualified_name" in data and "value" in data and "__is_pydantic" not in data:
                data = dict(data, __is_pydantic=True)
            text = json.dumps(data)
        elif isinstance(data, str):
            text = data
        else:
            raise BadRequest(
                "`data` must be a serialized event: the JSON object llama-index's JsonSerializer "
                "makes of it, or a string holding that JSON"
            )
        try:
            event = flavor.JsonSerializer().deserialize(text)
        except Exception as exc:
            raise BadRequest(f"cannot deserialize the event: {describe(exc)}") from None
        if not isinstance(event, flavor.Event):
            raise BadRequest(
                f"`data` is not a serialized {flavor.package} event (it gives a "
                f"{type(event).__name__}); expected {{\"__is_pydantic\": true, \"value\": {{...}}, "
                "\"qualified_name\": \"module.EventClass\"}"
            )
        ctx = getattr(entry.handler, "ctx", None)
        if ctx is None or entry.done.done():
            return False
        ctx.send_event(event)
        return True

    def cancel(self, task_id: str) -> bool:
        """Cancels a running task's workflow (deployd's `POST /tasks/{id}/cancel`): its answer
        then ends with an error line. False when no such task runs here."""
        entry = self.running.get(task_id)
        if entry is None or entry.done.done():
            return False
        log(f"task {task_id} (attempt {entry.attempt}): cancelled by deployd")
        entry.cancelled = True
        self._cancel(entry)
        return True

    async def cancel_all(self) -> None:
        for entry in list(self.running.values()):
            self._cancel(entry)
        if self._background:
            await asyncio.wait(set(self._background), timeout=2.0)
