"""Asks a human for a name, then greets them."""

from wflib import (
    Context,
    HumanResponseEvent,
    InputRequiredEvent,
    StartEvent,
    StopEvent,
    Workflow,
    step,
)


class HitlWorkflow(Workflow):
    @step
    async def ask(self, ctx: Context, ev: StartEvent) -> InputRequiredEvent:
        return InputRequiredEvent(prefix=ev.get("question", "What is your name? "))

    @step
    async def greet(self, ctx: Context, ev: HumanResponseEvent) -> StopEvent:
        return StopEvent(result=f"Hello, {ev.response}!")


hitl_workflow = HitlWorkflow(timeout=60)
