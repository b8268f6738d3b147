import time, asyncio
from node.process_pool import ProcessPool
async def test_x():
    for _ in range(3):
        p = ProcessPool(2); t = time.monotonic(); await p.start(); print("start", time.monotonic() - t)
        t = time.monotonic(); await p.close(); print("close", time.monotonic() - t)
