"""EngineStats: the snapshot after every step says what the step computed and what
the engine holds; AsyncEngine hands the latest one to the event loop."""

from __future__ import annotations

import asyncio
import time

from splitserve.engine.async_engine import AsyncEngine
from splitserve.engine.sampling import SamplingParams
from splitserve.engine.stats import EngineStats

GREEDY = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)


def test_steps_count_prefill_chunks_then_decode_tokens(tiny_engine) -> None:
    engine = tiny_engine(max_num_batched_tokens=8)  # page size 4
    engine.add_request("a", list(range(1, 13)), GREEDY)  # 12 prompt tokens: chunks 8 + 4
    engine.add_request("b", [5, 6, 7], GREEDY)
    before = engine.stats()
    assert (before.num_waiting, before.num_running, before.queue_depth) == (2, 0, 2)
    assert before.num_pages_used == 0 and before.num_steps == 0

    engine.step()  # a: 8 prompt tokens; budget spent
    s1 = engine.stats()
    assert (s1.last_step.num_prefill_tokens, s1.last_step.num_decode_tokens) == (8, 0)
    assert (s1.num_running, s1.num_waiting, s1.num_steps) == (1, 1, 1)
    assert s1.num_pages_used == 2 and s1.last_step.duration_s > 0

    engine.step()  # a: last 4 prompt tokens (samples its first token); b: 3 tokens
    s2 = engine.stats()
    assert (s2.last_step.num_prefill_tokens, s2.last_step.num_decode_tokens) == (7, 0)

    engine.step()  # both decode one token: contexts 12+1 and 3+1
    s3 = engine.stats()
    assert (s3.last_step.num_prefill_tokens, s3.last_step.num_decode_tokens) == (0, 2)
    assert s3.last_step.num_context_tokens == 13 + 4
    assert s3.decode_load == 2 / engine.config.max_num_seqs

    while engine.has_unfinished:
        engine.step()
    done = engine.stats()
    assert (done.num_running, done.num_waiting, done.num_pages_used) == (0, 0, 0)
    assert done.num_pages_free == done.num_pages_total == engine.info.num_pages


def test_remote_pending_counts_in_queue_depth_and_pages(tiny_engine) -> None:
    engine = tiny_engine()
    plan = engine.reserve_remote("r", list(range(1, 11)), GREEDY, attempt=1,
                                 release_at=time.monotonic() + 60)
    assert plan is not None
    s = engine.stats()
    assert (s.num_remote_pending, s.num_waiting, s.queue_depth) == (1, 0, 1)
    assert s.num_pages_used == len(plan.landing_page_ids) + 1  # + the owned partial page
    assert s.kv_usage == s.num_pages_used / s.num_pages_total


def test_cached_prefix_tokens_counts_whole_cached_pages(tiny_engine) -> None:
    engine = tiny_engine()
    prompt = list(range(1, 11))  # pages [1-4] [5-8] [9-10]
    assert engine.cached_prefix_tokens(prompt) == 0
    engine.generate([prompt], GREEDY)
    assert engine.cached_prefix_tokens(prompt) == 8
    assert engine.cached_prefix_tokens(prompt[:8]) == 4  # never the last token
    assert tiny_engine(enable_prefix_cache=False).cached_prefix_tokens(prompt) == 0


async def test_async_engine_publishes_a_snapshot_after_steps_and_commands(tiny_engine) -> None:
    engine = AsyncEngine(tiny_engine())
    seen: list[EngineStats] = []
    engine.stats_listeners.append(seen.append)
    assert engine.stats.num_steps == 0 and engine.info.page_size == 4
    await engine.start()
    try:
        async for _ in engine.generate("a", [1, 2, 3, 4, 5], GREEDY):
            pass
        await asyncio.sleep(0.2)  # the last snapshot follows the last output
        assert engine.stats is seen[-1]
        assert engine.stats.num_steps == 3  # prefill + 2 decode steps
        assert (engine.stats.num_running, engine.stats.num_pages_used) == (0, 0)
        assert [s.num_steps for s in seen] == sorted(s.num_steps for s in seen)
        assert sum(s.last_step.num_decode_tokens for s in seen
                   if s.last_step.num_decode_tokens) >= 2
        # a command alone (no step) publishes too
        n = len(seen)
        await engine.call(lambda e: e.reserve_remote("r", [1, 2, 3, 4, 5, 6], GREEDY, 1,
                                                     time.monotonic() + 60))
        await asyncio.sleep(0.2)
        assert len(seen) > n and engine.stats.num_remote_pending == 1
    finally:
        await engine.stop()
