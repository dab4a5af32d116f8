"""Echoes its message after streaming three progress events."""

import asyncio

from wflib import Context, Event, StartEvent, StopEvent, Workflow, step


class Progress(Event):
    step: int
    message: str


class EchoWorkflow(Workflow):
    @step
    async def echo(self, ctx: Context, ev: StartEvent) -> StopEvent:
        message = ev.get("message", "")
        delay = float(ev.get("delay", 0))
        for i in (1, 2, 3):
            ctx.write_event_to_stream(Progress(step=i, message=message))
            if delay:
                await asyncio.sleep(delay)
        return StopEvent(result=f"Message received: {message}")


class Point(StopEvent):
    x: int
    y: int


class ObjectWorkflow(Workflow):
    """Results that are not strings."""

    @step
    async def answer(self, ev: StartEvent) -> StopEvent:
        kind = ev.get("kind", "dict")
        if kind == "dict":
            return StopEvent(result={"n": 1, "items": [1, 2.5, "x", None, True]})
        if kind == "none":
            return StopEvent(result=None)
        if kind == "number":
            return StopEvent(result=42)
        return StopEvent(result={1, 2} if kind == "set" else object())


echo_workflow = EchoWorkflow(timeout=30)
short_timeout = EchoWorkflow(timeout=0.5)
object_workflow = ObjectWorkflow(timeout=30)


class PointWorkflow(Workflow):
    """Ends with a custom StopEvent, which the run returns whole."""

    @step
    async def answer(self, ev: StartEvent) -> Point:
        return Point(x=1, y=2)


point_workflow = PointWorkflow(timeout=30)
not_a_workflow = "a string"
