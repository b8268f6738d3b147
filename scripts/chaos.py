"""Chaos test: kill -9 and restart the broker at random moments while work flows.

    python scripts/chaos.py [--restarts 20] [--nodes 2] [--seed N] [--keep]

A client keeps submitting small batches and two nodes keep working while the broker
(``--durability full``) is SIGKILLed and restarted on the same ports and data directory at
random intervals. At the end every acknowledged task id must have exactly one final result,
SUCCESS, and must have run at least once (tasks leave a marker per run; runs beyond one are
the at-least-once re-executions, counted and printed). Exits 0 when all of that holds.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

from flowrra import Flowrra, TaskStatus
from flowrra.processes import BrokerProcess, Launcher

ROOT = Path(__file__).resolve().parent.parent
APP = "tests.apps.durable:app"


def start_cluster(launcher: Launcher, nodes: int) -> BrokerProcess:
    """A durable broker with short heartbeats and ``nodes`` nodes serving the durable app."""
    broker = launcher.broker(durability="full", heartbeat_ms=200, liveness=3)
    for i in range(nodes):
        launcher.node(broker, APP, concurrency=20, node_id=f"chaos-node-{i}")
    return broker


async def run(restarts: int, node_count: int, seed: int, workdir: Path) -> int:
    from tests.apps import durable

    rng = random.Random(seed)
    markers = workdir / "markers"
    markers.mkdir()
    # Every process's output goes to workdir/logs (kept with --keep), not into memory.
    (workdir / "logs").mkdir()
    launcher = Launcher(
        workdir, python_path=[ROOT], node_cwd=ROOT, keep_lines=500, log_dir=workdir / "logs"
    )
    broker = start_cluster(launcher, node_count)
    client = Flowrra.from_urls(broker=broker.url, connect_timeout=30, request_timeout=120)
    for spec in durable.app.tasks.values():
        client.task(name=spec.name, max_retries=spec.max_retries)(spec.fn)
    acknowledged: dict[str, str] = {}
    stop_submitting = asyncio.Event()
    started = time.monotonic()

    async def submitter(name: str) -> None:
        batch = 0
        while not stop_submitting.is_set():
            keys = [f"{name}{batch}-{i}" for i in range(rng.randint(1, 30))]
            calls = [(str(markers), key, rng.choice((0.0, 0.0, 0.01, 0.05))) for key in keys]
            ids = await client.submit_many(durable.record, calls)
            acknowledged.update(zip(ids, keys, strict=True))
            batch += 1
            await asyncio.sleep(rng.uniform(0.0, 0.05))

    try:
        async with client:
            submitting = asyncio.gather(*(submitter(f"c{c}b") for c in range(3)))
            for n in range(1, restarts + 1):
                await asyncio.sleep(rng.uniform(0.2, 0.9))
                broker.process.kill9()
                await asyncio.sleep(rng.uniform(0.0, 0.3))  # random downtime, not a wait
                # In a thread: the client's loop goes on (and retries) while it starts.
                broker = await asyncio.to_thread(launcher.restart, broker)
                print(f"restart {n}/{restarts}: {len(acknowledged)} tasks acknowledged so far")
            stop_submitting.set()
            await submitting
            results = await asyncio.gather(
                *(client.wait_for_result(task_id, timeout=120) for task_id in acknowledged)
            )
    finally:
        for problem in launcher.close():
            print(f"teardown: {problem}")

    failures = [r for r in results if r.status is not TaskStatus.SUCCESS]
    wrong = [r for r in results if r.result != acknowledged[r.task_id]]
    run_counts = {key: 0 for key in acknowledged.values()}
    for marker in markers.iterdir():
        key = marker.name.split(".", 1)[0]
        run_counts[key] = run_counts.get(key, 0) + 1
    never_ran = [key for key, count in run_counts.items() if count == 0]
    extra_runs = sum(count - 1 for count in run_counts.values() if count > 1)
    elapsed = time.monotonic() - started
    print(
        f"{len(acknowledged)} tasks acknowledged, {restarts} broker kills, "
        f"{len(results)} final results in {elapsed:.1f}s; "
        f"{extra_runs} extra runs (at-least-once), {len(failures)} not successful, "
        f"{len(wrong)} with a wrong result, {len(never_ran)} never ran"
    )
    ok = not failures and not wrong and not never_ran and len(results) == len(acknowledged)
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--restarts", type=int, default=20)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    print(f"seed {seed}")
    workdir = Path(tempfile.mkdtemp(prefix="flowrra-chaos-"))
    if args.keep:
        print(f"work directory {workdir}")
    sys.path.insert(0, str(ROOT))
    try:
        code = asyncio.run(run(args.restarts, args.nodes, seed, workdir))
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    sys.exit(code)


if __name__ == "__main__":
    main()
