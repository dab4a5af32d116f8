"""The baseline of `steps.rs`: pydantic_graph v1 running the same chain graph with its
FileStatePersistence (which rewrites the whole history on every step, without fsync).

Prints one JSON line: {"steps": N, "seconds": S, "steps_per_sec": R} per requested length.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

warnings.simplefilter("ignore")  # the BaseNode API is deprecated in favour of v2's builder

from pydantic_graph import BaseNode, End, Graph, GraphRunContext
from pydantic_graph.persistence.file import FileStatePersistence


@dataclass
class Count:
    count: int = 0


@dataclass
class Tick(BaseNode[Count, None, int]):
    i: int
    n: int

    async def run(self, ctx: GraphRunContext[Count]) -> Tick | End[int]:
        ctx.state.count += 1
        if self.i + 1 >= self.n:
            return End(ctx.state.count)
        return Tick(self.i + 1, self.n)


GRAPH = Graph(nodes=[Tick])


async def measure(steps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        persistence = FileStatePersistence(Path(tmp) / "run.json")
        start = time.perf_counter()
        result = await GRAPH.run(Tick(0, steps), state=Count(), persistence=persistence)
        seconds = time.perf_counter() - start
        assert result.output == steps, result.output
        return {"steps": steps, "seconds": seconds, "steps_per_sec": steps / seconds}


def main() -> None:
    for arg in sys.argv[1:] or ["1000"]:
        print(json.dumps(asyncio.run(measure(int(arg)))), flush=True)


if __name__ == "__main__":
    main()
