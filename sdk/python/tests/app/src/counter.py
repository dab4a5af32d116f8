"""Counts the tasks of a session in its context."""

from wflib import Context, StartEvent, StopEvent, Workflow, step, store_get, store_set


class CounterWorkflow(Workflow):
    @step
    async def count(self, ctx: Context, ev: StartEvent) -> StopEvent:
        n = await store_get(ctx, "count", 0) + 1
        await store_set(ctx, "count", n)
        return StopEvent(result=n)


counter = CounterWorkflow(timeout=30)
