"""Four llama-index workflows: streamed events, a session counter, a human in the loop, and slow work."""

import asyncio

from llama_index.core.workflow import (
    Context,
    Event,
    HumanResponseEvent,
    InputRequiredEvent,
    StartEvent,
    StopEvent,
    Workflow,
    step,
)


class Progress(Event):
    step: int
    message: str


class EchoWorkflow(Workflow):
    """Streams three progress events, then echoes the message."""

    @step()
    async def run_step(self, ctx: Context, ev: StartEvent) -> StopEvent:
        message = str(ev.get("message", ""))
        for n in range(1, 4):
            ctx.write_event_to_stream(Progress(step=n, message=message))
            await asyncio.sleep(0.01)
        return StopEvent(result=f"Message received: {message}")


class CounterWorkflow(Workflow):
    """Counts the tasks run in its session: 1, then 2, ... (a new session starts at 1)."""

    @step()
    async def count(self, ctx: Context, ev: StartEvent) -> StopEvent:
        count = await ctx.get("count", default=0) + 1
        await ctx.set("count", count)
        return StopEvent(result=str(count))


class ApprovalWorkflow(Workflow):
    """Asks a human, then answers with what the human said."""

    @step()
    async def ask(self, ctx: Context, ev: StartEvent) -> InputRequiredEvent:
        return InputRequiredEvent(prefix=f"approve {ev.get('item', 'this')}? ")

    @step()
    async def answer(self, ev: HumanResponseEvent) -> StopEvent:
        return StopEvent(result=f"human said: {ev.response}")


class SlowWorkflow(Workflow):
    """Streams a Progress event every second for `seconds` seconds, then answers: a long task
    to watch, or to cancel."""

    @step()
    async def work(self, ctx: Context, ev: StartEvent) -> StopEvent:
        seconds = int(ev.get("seconds", 10))
        for n in range(1, seconds + 1):
            ctx.write_event_to_stream(Progress(step=n, message=f"{n} of {seconds}"))
            await asyncio.sleep(1)
        return StopEvent(result=f"worked {seconds} seconds")


echo_workflow = EchoWorkflow()
counter_workflow = CounterWorkflow()
approval_workflow = ApprovalWorkflow(timeout=300)
slow_workflow = SlowWorkflow(timeout=3600)
