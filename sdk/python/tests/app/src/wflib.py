"""The workflow library the test workflows are written with: llama-index-workflows (`workflows`)
or llama-index-core (`llama_index.core.workflow`), chosen by DEPLOYD_TEST_FLAVOR."""

import os

FLAVOR = os.environ.get("DEPLOYD_TEST_FLAVOR")
if not FLAVOR:
    try:
        import workflows  # noqa: F401

        FLAVOR = "workflows"
    except ImportError:
        FLAVOR = "core"

if FLAVOR == "core":
    from llama_index.core.workflow import (  # noqa: F401
        Context,
        Event,
        HumanResponseEvent,
        InputRequiredEvent,
        StartEvent,
        StopEvent,
        Workflow,
        step,
    )
else:
    from workflows import Context, Workflow, step  # noqa: F401
    from workflows.events import (  # noqa: F401
        Event,
        HumanResponseEvent,
        InputRequiredEvent,
        StartEvent,
        StopEvent,
    )


async def store_get(ctx, key, default):
    store = getattr(ctx, "store", None)
    if store is not None:
        return await store.get(key, default=default)
    return await ctx.get(key, default=default)


async def store_set(ctx, key, value):
    store = getattr(ctx, "store", None)
    if store is not None:
        await store.set(key, value)
    else:
        await ctx.set(key, value)
