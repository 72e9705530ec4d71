"""ponder.AsyncEngine: the engine stepped by a background thread, called from asyncio tasks and
from threads at the same time (scripted models of test_search / test_engine)."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time

from ponder import AsyncEngine
from ponder.testing.scripted import MIXED_SEARCHES as MIX
from ponder.testing.scripted import ScriptedPRM, SeededScriptedPolicy
from ponder.testing.scripted import result_signature as signature
from ponder.testing.scripted import scripted_config as _config
from ponder.testing.scripted import search_alone as alone


def test_concurrent_async_searches_match_their_lone_runs():
    async def main():
        async with AsyncEngine(SeededScriptedPolicy(), ScriptedPRM()) as engine:
            jobs = [engine.search(p, c) for p, c in MIX] + [engine.search(p, dataclasses.replace(c, seed=99)) for p, c in MIX]
            results = await asyncio.gather(*jobs)
            return results, engine.stats()

    results, stats = asyncio.run(main())
    wants = [alone(p, c) for p, c in MIX] + [alone(p, dataclasses.replace(c, seed=99)) for p, c in MIX]
    assert [signature(r) for r in results] == [signature(w) for w in wants]
    assert stats["finished"] == len(wants) and stats["live"] == stats["queued"] == 0
    assert stats["mean_policy_batch"] > 4  # the tasks' searches shared batches


def test_stream_yields_events_then_end_and_threads_submit_too():
    cfg = _config(method="beam_search", n=4, beam_width=2, seed=5)
    got_threads: list = []

    def worker(engine, k):
        h = engine.submit("gamma", dataclasses.replace(cfg, seed=k))
        got_threads.append((k, h.result(timeout=60)))

    async def main():
        engine = AsyncEngine(SeededScriptedPolicy(), ScriptedPRM())
        threads = [threading.Thread(target=worker, args=(engine, k)) for k in range(4)]
        for t in threads:
            t.start()
        events = [ev async for ev in engine.stream("alpha", cfg)]
        for t in threads:
            t.join()
        engine.close()
        return events

    events = asyncio.run(main())
    assert events[-1].kind == "end" and [e.kind for e in events].count("end") == 1
    assert any(e.kind == "step" for e in events) and any(e.kind == "completion" for e in events)
    assert signature(events[-1].result) == signature(alone("alpha", cfg))
    assert sorted(k for k, _ in got_threads) == [0, 1, 2, 3]
    for k, r in got_threads:
        assert signature(r) == signature(alone("gamma", dataclasses.replace(cfg, seed=k)))


class SlowPolicy(SeededScriptedPolicy):
    def sample_steps_seeded(self, *a):
        time.sleep(0.02)  # a search of several steps outlives the cancelling task's first await
        return super().sample_steps_seeded(*a)


def test_a_cancelled_task_cancels_its_search():
    policy = SlowPolicy()

    async def main():
        engine = AsyncEngine(policy, ScriptedPRM())
        long = _config(method="dvts", n=8, beam_width=2, seed=1, num_iterations=8, max_steps=8)
        task = asyncio.create_task(engine.search("beta", long))
        await asyncio.sleep(0.03)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        other = await engine.search("alpha", _config(method="majority", n=2, seed=2))
        while engine.stats()["live"]:
            await asyncio.sleep(0.01)
        stats = engine.stats()
        engine.close()
        return other, stats

    other, stats = asyncio.run(main())
    assert other.stopped is None
    assert stats["finished"] == 2 and stats["cancelled"] == 1 and stats["live"] == 0
    assert policy.released == set(policy.paths)  # the cancelled search freed its nodes
