"""Remote prefill in the engine: landing pages, accept, fallback and the fence invariant.

A second engine plays the prefill worker; its pages are copied into the decode
engine's landing pages by id (what a NIXL write does between processes; the real
transfer is tested in tests/integration).
"""

from __future__ import annotations

import time

import pytest
import torch

from splitserve.engine.page_allocator import page_hashes
from splitserve.engine.remote_prefill import AcceptRefusal
from splitserve.engine.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=10, temperature=0)
FAR = 1e12  # a release time that is never reached in a test
FIRST_TOKEN = SamplingParams(max_tokens=1, temperature=0)


def remote_prefill(prefill, decode, request_id, prompt, plan,
                   params=FIRST_TOKEN) -> int:
    """Run the prompt on `prefill`, copy its pages into `plan`'s landing pages."""
    prefill.add_request(request_id, prompt, params, hold_pages=True)
    outs = []
    while prefill.has_unfinished:
        outs += prefill.step()
    first_token = outs[-1].new_token_ids[0]
    ps = prefill.config.page_size
    src = prefill.held_pages(request_id)[plan.num_cached_tokens // ps: -(-len(prompt) // ps)]
    assert len(src) == len(plan.landing_page_ids)
    decode.pool.tensor[plan.landing_page_ids] = prefill.pool.tensor[src]
    prefill.release_held(request_id)
    return first_token


def run_to_end(engine, request_id) -> list[int]:
    tokens = []
    while engine.has_unfinished:
        tokens += [t for o in engine.step() if o.request_id == request_id
                   for t in o.new_token_ids]
    return tokens


@pytest.mark.parametrize("prompt_len", [13, 16, 1])  # partial last page, exact pages, tiny
def test_remote_prefill_equals_local(tiny_engine, prompt_len) -> None:
    prompt = [(7 * i + 3) % 500 for i in range(prompt_len)]
    [expected] = tiny_engine().generate([prompt], GREEDY)
    decode, prefill = tiny_engine(), tiny_engine()
    plan = decode.reserve_remote("r", prompt, GREEDY, attempt=1, release_at=FAR)
    assert plan is not None and plan.num_cached_tokens == 0
    assert len(plan.landing_page_ids) == -(-prompt_len // 4)
    first = remote_prefill(prefill, decode, "r", prompt, plan)
    out = decode.accept_remote("r", 1, first)
    assert out.new_token_ids == [first]
    assert [first] + run_to_end(decode, "r") == expected
    assert prefill.allocator.num_used_pages == 0  # released after the "transfer"
    # landing pages are quarantined, not free, until the lease has expired
    assert decode.allocator.num_quarantined_pages == len(plan.landing_page_ids)
    assert decode.allocator.num_used_pages == 0


def test_prefix_cache_hit_sends_only_the_tail(tiny_engine) -> None:
    shared = list(range(200, 224))  # 6 full pages
    decode, prefill = tiny_engine(), tiny_engine()
    decode.generate([shared + [1, 2]], GREEDY)
    prompt = shared + [5, 6, 7, 8, 9]
    [expected] = tiny_engine().generate([prompt], GREEDY)
    plan = decode.reserve_remote("r", prompt, GREEDY, attempt=1, release_at=FAR)
    assert plan.num_cached_tokens == 24 and len(plan.landing_page_ids) == 2
    first = remote_prefill(prefill, decode, "r", prompt, plan)
    decode.accept_remote("r", 1, first)
    assert [first] + run_to_end(decode, "r") == expected


def test_late_write_to_the_partial_landing_page_cannot_corrupt(tiny_engine) -> None:
    prompt = list(range(30, 43))  # 13 tokens: the 4th landing page is partial
    [expected] = tiny_engine().generate([prompt], GREEDY)
    decode, prefill = tiny_engine(), tiny_engine()
    plan = decode.reserve_remote("r", prompt, GREEDY, attempt=1, release_at=FAR)
    first = remote_prefill(prefill, decode, "r", prompt, plan)
    decode.accept_remote("r", 1, first)
    tokens = [first] + [t for o in decode.step() for t in o.new_token_ids]
    decode.pool.tensor[plan.landing_page_ids[-1]] = float("nan")  # a duplicate write lands
    assert tokens + run_to_end(decode, "r") == expected


def test_stale_or_duplicate_kv_ready_is_ignored(tiny_engine) -> None:
    decode = tiny_engine()
    plan = decode.reserve_remote("r", [1, 2, 3], GREEDY, attempt=2, release_at=FAR)
    assert plan is not None
    assert decode.accept_remote("r", 1, 5) is AcceptRefusal.STALE  # old attempt
    assert decode.accept_remote("other", 2, 5) is AcceptRefusal.STALE  # unknown request
    assert decode.accept_remote("r", 2, 10**9) is AcceptRefusal.BAD_FIRST_TOKEN
    assert decode.accept_remote("r", 2, 5).new_token_ids == [5]
    assert decode.accept_remote("r", 2, 5) is AcceptRefusal.STALE  # duplicate


def test_fallback_recomputes_locally_and_fences_old_landing_pages(tiny_engine) -> None:
    prompt = list(range(60, 77))
    [expected] = tiny_engine().generate([prompt], GREEDY)
    decode = tiny_engine(num_pages=16)
    release_at = time.monotonic() + 0.3
    plan = decode.reserve_remote("r", prompt, GREEDY, attempt=1, release_at=release_at)
    assert decode.fallback_remote("r")
    assert decode.allocator.num_quarantined_pages == len(plan.landing_page_ids)
    zombie = list(plan.landing_page_ids)
    tokens = []
    while decode.has_unfinished:
        # a zombie prefill writes garbage into the old landing pages the whole time
        decode.pool.tensor[zombie] = float("nan")
        assert not set(zombie) & {p for s in decode.scheduler.running for p in s.page_ids}
        tokens += [t for o in decode.step() for t in o.new_token_ids]
    assert tokens == expected
    assert decode.accept_remote("r", 1, 3) is AcceptRefusal.STALE  # its KVReady is late
    assert decode.allocator.num_quarantined_pages == len(zombie)
    time.sleep(max(0.0, release_at - time.monotonic()))
    decode.allocator.release_quarantined(time.monotonic())
    assert decode.allocator.num_free_pages == 16


def test_reserve_without_room_returns_none_and_leaks_nothing(tiny_engine) -> None:
    decode = tiny_engine(num_pages=8)
    decode.add_request("big", list(range(20)), SamplingParams(max_tokens=4, temperature=0))
    decode.step()
    other = list(range(300, 320))  # no prefix in common with "big"
    assert decode.reserve_remote("r", other, GREEDY, 1, FAR) is None
    run_to_end(decode, "big")
    assert decode.allocator.num_used_pages == 0
    assert decode.reserve_remote("r", other, GREEDY, 1, FAR) is not None


def test_abort_while_waiting_for_kv_quarantines_landing_pages(tiny_engine) -> None:
    decode = tiny_engine()
    plan = decode.reserve_remote("r", list(range(9)), GREEDY, 1, FAR)
    out = decode.abort("r")
    assert out.finish_reason.value == "abort"
    assert decode.allocator.num_quarantined_pages == len(plan.landing_page_ids)
    assert decode.allocator.num_used_pages == 0


def test_preempted_remote_sequence_keeps_fence(tiny_engine) -> None:
    decode, prefill = tiny_engine(num_pages=12), tiny_engine()
    prompt = list(range(9))
    plan = decode.reserve_remote("r", prompt, SamplingParams(max_tokens=30, temperature=0),
                                 1, FAR)
    first = remote_prefill(prefill, decode, "r", prompt, plan)
    decode.accept_remote("r", 1, first)
    decode.add_request("hog", list(range(100, 120)), SamplingParams(max_tokens=8,
                                                                     temperature=0))
    while decode.has_unfinished:
        decode.step()
    assert decode.allocator.num_quarantined_pages == len(plan.landing_page_ids)
    assert torch.isfinite(decode.pool.tensor).all()


def test_retry_uses_fresh_landing_pages_and_fences_the_old_ones(tiny_engine) -> None:
    prompt = list(range(80, 93))  # 13 tokens, partial last page
    [expected] = tiny_engine().generate([prompt], GREEDY)
    decode, prefill = tiny_engine(num_pages=16), tiny_engine()
    release_at = time.monotonic() + 0.3
    first_plan = decode.reserve_remote("r", prompt, GREEDY, attempt=1, release_at=release_at)
    plan = decode.retry_remote("r", 2, FAR)
    assert plan is not None and plan.attempt == 2
    zombie = list(first_plan.landing_page_ids)
    assert not set(zombie) & set(plan.landing_page_ids)
    assert decode.allocator.num_quarantined_pages == len(zombie)
    assert decode.accept_remote("r", 1, 3) is AcceptRefusal.STALE  # attempt 1's is stale
    first = remote_prefill(prefill, decode, "r", prompt, plan)
    decode.pool.tensor[zombie] = float("nan")  # attempt 1's zombie writes land late
    assert decode.accept_remote("r", 2, first).new_token_ids == [first]
    assert [first] + run_to_end(decode, "r") == expected
    time.sleep(max(0.0, release_at - time.monotonic()))
    decode.allocator.release_quarantined(time.monotonic())
    assert decode.allocator.num_quarantined_pages == len(plan.landing_page_ids)  # attempt 2's


def test_retry_without_room_queues_a_local_prefill(tiny_engine) -> None:
    prompt = list(range(100, 120))  # 5 pages
    [expected] = tiny_engine().generate([prompt], GREEDY)
    decode = tiny_engine(num_pages=8)
    release_at = time.monotonic() + 0.3
    assert decode.reserve_remote("r", prompt, GREEDY, 1, release_at) is not None
    # attempt 1's 5 landing pages are quarantined: 3 free pages cannot land attempt 2
    assert decode.retry_remote("r", 2, FAR) is None
    assert decode.allocator.num_free_pages == 3
    assert decode.retry_remote("unknown", 2, FAR) is None
    assert run_to_end(decode, "r") == expected


def test_seeded_sampling_is_identical_across_disaggregation(tiny_engine) -> None:
    prompt = list(range(140, 158))
    sampled = SamplingParams(max_tokens=16, temperature=1.0, top_k=40, top_p=0.9, seed=77)
    [expected] = tiny_engine().generate([prompt], sampled)
    decode, prefill = tiny_engine(), tiny_engine()
    plan = decode.reserve_remote("r", prompt, sampled, attempt=1, release_at=FAR)
    # the prefill worker samples the first token with the request's seed
    first = remote_prefill(prefill, decode, "r", prompt, plan,
                           SamplingParams(max_tokens=1, temperature=1.0, top_k=40, top_p=0.9,
                                          seed=77, ignore_eos=True))
    assert first == expected[0]
    decode.accept_remote("r", 1, first)
    assert [first] + run_to_end(decode, "r") == expected
    [other_seed] = tiny_engine().generate([prompt], SamplingParams(
        max_tokens=16, temperature=1.0, top_k=40, top_p=0.9, seed=78))
    assert other_seed != expected  # the test can tell seeds apart


def test_owned_page_is_reserved_with_the_landing_pages(tiny_engine) -> None:
    """Accepting a KVReady needs no free page: the owned copy of the partial last page
    is reserved with the landing pages (with the pool full at accept time, it used to
    raise MemoryError and the abort freed the landing pages)."""
    prompt = list(range(30, 43))  # 13 tokens: 4 landing pages, the last one partial
    short = SamplingParams(max_tokens=3, temperature=0)  # fits the owned page
    [expected] = tiny_engine().generate([prompt], short)
    decode, prefill = tiny_engine(num_pages=5), tiny_engine()
    plan = decode.reserve_remote("r", prompt, short, attempt=1, release_at=FAR)
    assert plan.owned_page_id is not None and plan.owned_page_id not in plan.landing_page_ids
    assert decode.allocator.num_free_pages == 0  # 4 landing + 1 owned
    first = remote_prefill(prefill, decode, "r", prompt, plan)
    assert decode.accept_remote("r", 1, first).new_token_ids == [first]
    assert decode.scheduler.running[0].page_ids[-1] == plan.owned_page_id
    assert [first] + run_to_end(decode, "r") == expected
    assert decode.allocator.num_quarantined_pages == 4
    assert decode.allocator.num_free_pages == 1  # the owned page
    # a prompt that fills its last page reserves no owned page
    assert tiny_engine().reserve_remote("x", list(range(16)), GREEDY, 1, FAR).owned_page_id \
        is None


def test_reserve_without_room_for_the_owned_page_returns_none(tiny_engine) -> None:
    decode = tiny_engine(num_pages=16)
    decode.allocator.allocate(12)
    assert decode.reserve_remote("r", list(range(13)), GREEDY, 1, FAR) is None  # needs 5
    assert decode.allocator.num_free_pages == 4
    assert decode.reserve_remote("r", list(range(12)), GREEDY, 1, FAR) is not None  # 3


def test_checksum_mismatch_keeps_the_attempt_pending_and_fenced(tiny_engine) -> None:
    prompt = list(range(50, 63))
    [expected] = tiny_engine().generate([prompt], GREEDY)
    decode, prefill = tiny_engine(num_pages=16), tiny_engine()
    plan = decode.reserve_remote("r", prompt, GREEDY, attempt=1, release_at=FAR)
    first = remote_prefill(prefill, decode, "r", prompt, plan)
    seen = []

    def corrupt(pool, page_ids):
        seen.append(list(page_ids))
        return False

    assert decode.accept_remote("r", 1, first, verify=corrupt) is AcceptRefusal.CHECKSUM_MISMATCH
    assert seen == [plan.landing_page_ids]
    assert decode.scheduler.running == [] and decode.remote.plan("r") is plan
    assert decode.fallback_remote("r")  # the caller gives up: pages fenced, local prefill
    assert decode.allocator.num_quarantined_pages == len(plan.landing_page_ids)
    assert run_to_end(decode, "r") == expected


def test_failed_accept_changes_nothing_and_the_fallback_fences_the_pages(tiny_engine) -> None:
    """A copy that raises mid-accept (a fault hook: nothing outside can make it fail)
    leaves the attempt pending; the caller's fallback quarantines the landing pages."""
    prompt = list(range(70, 83))  # partial last page: accept copies it
    [expected] = tiny_engine().generate([prompt], GREEDY)
    decode, prefill = tiny_engine(num_pages=16), tiny_engine()
    plan = decode.reserve_remote("r", prompt, GREEDY, attempt=1, release_at=FAR)
    first = remote_prefill(prefill, decode, "r", prompt, plan)

    def broken_copy(src: int, dst: int) -> None:
        raise RuntimeError("copy failed")

    decode.remote.copy_page = broken_copy
    with pytest.raises(RuntimeError):
        decode.accept_remote("r", 1, first)
    assert decode.remote.plan("r") is plan and decode.scheduler.running == []
    assert decode.fallback_remote("r")
    assert decode.allocator.num_quarantined_pages == len(plan.landing_page_ids)
    assert decode.allocator.num_used_pages == 0  # the owned page is free again
    assert run_to_end(decode, "r") == expected


def _cached_page_ids(engine, prompt) -> list[int]:
    """The pages the prefix cache holds for `prompt`'s full pages (references dropped)."""
    hashes = page_hashes(prompt, engine.config.page_size)
    page_ids = engine.allocator.match_prefix(hashes)
    engine.allocator.free(page_ids)
    return page_ids


def test_accepted_landing_pages_enter_the_cache_once_their_fence_ends(tiny_engine) -> None:
    prompt = list(range(110, 123))  # 13 tokens: 3 full landing pages and a partial one
    more = prompt + [7, 8, 9, 10, 11]
    [expected] = tiny_engine().generate([more], GREEDY)
    decode, prefill = tiny_engine(num_pages=32), tiny_engine()
    release_at = time.monotonic() + 3600.0
    plan = decode.reserve_remote("r", prompt, GREEDY, attempt=1, release_at=release_at)
    first = remote_prefill(prefill, decode, "r", prompt, plan)
    checks = []
    decode.accept_remote("r", 1, first, verify=lambda pool, ids: checks.append(ids) or True)
    run_to_end(decode, "r")
    assert _cached_page_ids(decode, prompt) == []  # fenced: a late write may still land
    decode.allocator.release_quarantined(release_at)
    assert _cached_page_ids(decode, prompt) == plan.landing_page_ids[:3]
    assert checks == [plan.landing_page_ids] * 2  # at accept, and again at the release
    assert decode.allocator.num_published == 3
    # the next request reuses them, with the single-process engine's output
    hits = decode.allocator.num_cache_hits
    decode.add_request("next", more, GREEDY)
    assert run_to_end(decode, "next") == expected
    assert decode.allocator.num_cache_hits - hits == 12


def test_landing_pages_that_fail_the_check_at_release_are_not_published(tiny_engine) -> None:
    prompt = list(range(130, 146))  # 4 full pages
    decode, prefill = tiny_engine(num_pages=32), tiny_engine()
    plan = decode.reserve_remote("r", prompt, GREEDY, attempt=1, release_at=FAR)
    first = remote_prefill(prefill, decode, "r", prompt, plan)
    verdicts = iter([True, False])  # intact at accept; a duplicate write changed them later
    decode.accept_remote("r", 1, first, verify=lambda pool, ids: next(verdicts))
    run_to_end(decode, "r")
    decode.allocator.release_quarantined(FAR)
    assert _cached_page_ids(decode, prompt) == [] and decode.allocator.num_published == 0
    assert decode.allocator.num_free_pages == 32


def test_pages_of_an_attempt_given_up_are_never_published(tiny_engine) -> None:
    prompt = list(range(150, 166))  # 4 full pages
    decode = tiny_engine(num_pages=32)
    stale = decode.reserve_remote("r", prompt, GREEDY, attempt=1, release_at=FAR)
    decode.pool.tensor[stale.landing_page_ids] = float("nan")  # a zombie's write
    assert decode.fallback_remote("r")
    run_to_end(decode, "r")  # the local prefill publishes its own pages
    local = _cached_page_ids(decode, prompt)
    decode.allocator.release_quarantined(FAR)
    assert _cached_page_ids(decode, prompt) == local and decode.allocator.num_published == 0
    assert not set(local) & set(stale.landing_page_ids)
