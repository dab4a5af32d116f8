"""Answers with the id of the process that ran it (to see which worker served a task)."""

import asyncio
import os

from wflib import StartEvent, StopEvent, Workflow, step


class WhoAmI(Workflow):
    @step
    async def answer(self, ev: StartEvent) -> StopEvent:
        delay = float(ev.get("delay", 0))
        if delay:
            await asyncio.sleep(delay)
        return StopEvent(result=os.getpid())


whoami_workflow = WhoAmI(timeout=30)
