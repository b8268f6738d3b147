"""A task module that is also run as a script, to compare task names as ``__main__``.

``python mainscript.py`` (or ``python -m tests.apps.mainscript``) prints the name of each
task as the script computes it, then with ``--run [BROKER_URL]`` submits ``cube`` (a
cpu_bound task) on the embedded default or to a broker, and prints its result.
"""

import asyncio
import json
import sys

from flowrra import Flowrra

app = Flowrra.from_urls(processes=1)


@app.task()
async def greet(name: str) -> str:
    return f"hello {name}"


@app.task(cpu_bound=True)
def cube(x: int) -> int:
    return x * x * x


async def run(broker: str | None) -> None:
    target = app
    if broker:
        target = Flowrra.from_urls(broker=broker)
        target.task(cpu_bound=True)(cube)  # the same function: the same default name
        target.task()(greet)
    async with target:
        cube_id = await target.submit(cube, 3)
        greet_id = await target.submit(greet, "node")
        results = [await target.wait_for_result(i, timeout=20) for i in (cube_id, greet_id)]
    print(json.dumps([[r.task_name, r.status.value, r.result, r.error] for r in results]))


if __name__ == "__main__":
    print(json.dumps(sorted(app.tasks)), flush=True)
    if "--run" in sys.argv:
        rest = sys.argv[sys.argv.index("--run") + 1 :]
        asyncio.run(run(rest[0] if rest else None))
