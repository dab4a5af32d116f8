"""Raises in a step, after one streamed event."""

from wflib import Context, Event, StartEvent, StopEvent, Workflow, step


class Started(Event):
    note: str


class FailingWorkflow(Workflow):
    @step
    async def fail(self, ctx: Context, ev: StartEvent) -> StopEvent:
        ctx.write_event_to_stream(Started(note="about to fail"))
        raise ValueError(f"the input was {ev.get('what', 'bad')}")


failing_workflow = FailingWorkflow(timeout=30)
