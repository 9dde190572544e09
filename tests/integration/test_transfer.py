"""KV page transfer between real processes over NIXL/UCX (no fakes).

The writer (this process) holds a `TransferAgent`; receivers are `PeerProcess`
children with their own agents, exchanging descriptors over a pipe.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace

import pytest
import torch
from transfer_peer import SENTINEL, PeerProcess, PeerSpec

from splitserve.engine.kv_pool import KVPool
from splitserve.rpc.worker_pb2 import WorkerDescriptor
from splitserve.transfer import (
    DescriptorMismatch,
    InvalidPageIds,
    TransferAgent,
    TransferFailed,
    UnknownPeer,
)

# bf16, 4 layers, 2 KV heads, head_dim 64, 16 tokens: 32 KiB per page.
SPEC = PeerSpec(
    worker_id="decode-live", page_size=16, num_layers=4, num_kv_heads=2, head_dim=64,
    dtype="bfloat16", num_pages=48,
)
WRITER_PAGES = 24


def _random_bits(pool: KVPool, seed: int) -> None:
    """Fill with random bit patterns (NaNs included): equality is checked bit for bit."""
    gen = torch.Generator().manual_seed(seed)
    bits = pool.tensor.view(torch.int16)
    bits.copy_(torch.randint(-(2**15), 2**15, bits.shape, generator=gen, dtype=torch.int16))


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16)


@pytest.fixture(scope="module")
def transfer_live_peer() -> Iterator[PeerProcess]:
    peer = PeerProcess(SPEC)
    yield peer
    peer.stop()


@pytest.fixture
def transfer_fresh_peer() -> Iterator[PeerProcess]:
    peer = PeerProcess(replace(SPEC, worker_id="decode-fresh"))
    yield peer
    peer.stop()


@pytest.fixture
def transfer_writer() -> Iterator[TransferAgent]:
    pool = KVPool(SPEC.geometry, WRITER_PAGES)
    _random_bits(pool, seed=7)
    # A fresh name per test: peers keep per-name state for writers they have seen.
    agent = TransferAgent(f"prefill-{uuid.uuid4().hex[:8]}", pool, SPEC.model_fingerprint)
    yield agent
    agent.close()


@pytest.mark.timeout(60)
def test_pages_arrive_bit_exact_before_notification(
    transfer_writer: TransferAgent, transfer_fresh_peer: PeerProcess
) -> None:
    peer_id = transfer_writer.connect(transfer_fresh_peer.descriptor)
    expected = torch.full(
        (SPEC.num_pages, *SPEC.geometry.page_shape), SENTINEL, dtype=torch.bfloat16
    )
    gen = torch.Generator().manual_seed(99)
    free_remote = torch.randperm(SPEC.num_pages, generator=gen).tolist()
    for round_index in range(3):
        num_pages = 5 + 3 * round_index
        local_ids = torch.randperm(WRITER_PAGES, generator=gen)[:num_pages].tolist()
        remote_ids = [free_remote.pop() for _ in range(num_pages)]
        message = f"KVReady:req-{round_index}".encode()
        transfer_writer.write_pages(peer_id, local_ids, remote_ids, message, f"req-{round_index}")
        expected[remote_ids] = transfer_writer.pool.tensor[local_ids]

        note = transfer_fresh_peer.next_notification()
        assert note.message == message
        assert note.peer_id == transfer_writer.worker_id
        assert note.pool_at_notification is not None
        # Every written page is complete at the moment the notification is seen, and
        # pages never addressed still hold the sentinel.
        assert torch.equal(_bits(note.pool_at_notification), _bits(expected))
    assert transfer_writer.counters.num_failures == 0


@pytest.mark.timeout(60)
def test_empty_notification_writes_data_silently(
    transfer_writer: TransferAgent, transfer_live_peer: PeerProcess
) -> None:
    peer_id = transfer_writer.connect(transfer_live_peer.descriptor)
    transfer_writer.write_pages(peer_id, [10, 11], [40, 41], b"", "req-part-1")
    assert not transfer_live_peer.has_message(0.3)
    transfer_writer.write_pages(peer_id, [12], [42], b"KVReady:parts", "req-part-2")
    note = transfer_live_peer.next_notification()
    assert note.message == b"KVReady:parts" and note.pool_at_notification is not None
    assert torch.equal(
        _bits(note.pool_at_notification[40:43]), _bits(transfer_writer.pool.tensor[10:13])
    )


@pytest.mark.timeout(60)
async def test_async_write_delivers_notification(
    transfer_writer: TransferAgent, transfer_live_peer: PeerProcess
) -> None:
    peer_id = transfer_writer.connect(transfer_live_peer.descriptor)
    await transfer_writer.write_pages_async(peer_id, [3, 4], [46, 47], b"KVReady:async", "req-a")
    note = transfer_live_peer.next_notification()
    assert note.message == b"KVReady:async"
    assert note.pool_at_notification is not None
    assert torch.equal(
        _bits(note.pool_at_notification[46:48]), _bits(transfer_writer.pool.tensor[3:5])
    )


@pytest.mark.timeout(60)
def test_descriptors_are_the_contiguous_runs(
    transfer_writer: TransferAgent, transfer_live_peer: PeerProcess
) -> None:
    peer_id = transfer_writer.connect(transfer_live_peer.descriptor)
    cases = [
        ([0, 1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15], 1),
        ([0, 1, 2, 3, 10, 11], [20, 21, 22, 23, 24, 25], 2),  # local break
        ([0, 1, 2, 3], [30, 31, 40, 41], 2),  # remote break
        ([5, 3, 1, 7], [0, 1, 2, 3], 4),  # scattered
    ]
    for index, (local_ids, remote_ids, num_runs) in enumerate(cases):
        before = transfer_writer.counters.num_descriptors
        transfer_writer.write_pages(peer_id, local_ids, remote_ids, b"n%d" % index, f"req-{index}")
        assert transfer_live_peer.next_notification().message == b"n%d" % index
        assert transfer_writer.counters.num_descriptors - before == num_runs
    counters = transfer_writer.counters
    assert counters.num_transfers == len(cases)
    assert counters.num_bytes == (8 + 6 + 4 + 4) * SPEC.geometry.bytes_per_page
    assert counters.descriptor_latency.count == 1 + 2 + 2 + 4
    assert counters.transfer_latency.count == len(cases)


@pytest.mark.timeout(60)
def test_invalid_page_ids_post_nothing(
    transfer_writer: TransferAgent, transfer_live_peer: PeerProcess
) -> None:
    peer_id = transfer_writer.connect(transfer_live_peer.descriptor)
    with pytest.raises(InvalidPageIds, match="remote ids out of range"):
        transfer_writer.write_pages(peer_id, [0], [SPEC.num_pages], b"never", "req-bad")
    with pytest.raises(InvalidPageIds, match="local ids out of range"):
        transfer_writer.write_pages(peer_id, [WRITER_PAGES], [0], b"never", "req-bad")
    with pytest.raises(InvalidPageIds, match="2 local ids but 1 remote"):
        transfer_writer.write_pages(peer_id, [0, 1], [0], b"never", "req-bad")
    with pytest.raises(UnknownPeer):
        transfer_writer.write_pages("decode-nobody", [0], [0], b"never", "req-bad")
    assert transfer_writer.counters.num_transfers == 0
    assert transfer_writer.counters.num_failures == 0
    assert not transfer_live_peer.has_message(0.3)


@pytest.mark.timeout(60)
def test_connect_is_cached_per_peer(
    transfer_writer: TransferAgent, transfer_live_peer: PeerProcess,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    nixl = transfer_writer._nixl
    loads: list[bytes] = []
    real_add = nixl.add_remote_agent
    monkeypatch.setattr(nixl, "add_remote_agent", lambda md: loads.append(md) or real_add(md))
    for _ in range(3):
        assert transfer_writer.connect(transfer_live_peer.descriptor) == SPEC.worker_id
    assert len(loads) == 1
    assert transfer_writer.peer_ids == [SPEC.worker_id]

    # A role flip keeps the connection; another agent (a restart) replaces it.
    flipped = WorkerDescriptor()
    flipped.CopyFrom(transfer_live_peer.descriptor)
    flipped.role = "prefill"
    transfer_writer.connect(flipped)
    assert len(loads) == 1
    transfer_writer.write_pages(SPEC.worker_id, [0], [0], b"after-flip", "req-flip")
    assert transfer_live_peer.next_notification().message == b"after-flip"

    restarted = WorkerDescriptor()
    restarted.CopyFrom(transfer_live_peer.descriptor)
    restarted.num_pages -= 1
    restarted.pool_regions[0].num_bytes -= SPEC.geometry.bytes_per_page
    transfer_writer.connect(restarted)
    assert len(loads) == 2
    transfer_writer.connect(transfer_live_peer.descriptor)
    assert len(loads) == 3


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("field", "changes"),
    [("page_size", {"page_size": 32}), ("model_fingerprint", {"model_fingerprint": "other"})],
)
def test_mismatched_peer_is_refused(
    transfer_writer: TransferAgent, field: str, changes: dict[str, object]
) -> None:
    spec = replace(SPEC, worker_id=f"decode-{field}", **changes)  # type: ignore[arg-type]
    peer = PeerProcess(spec)
    try:
        with pytest.raises(DescriptorMismatch) as info:
            transfer_writer.connect(peer.descriptor)
        assert info.value.field == field
        assert field in str(info.value)
        assert not transfer_writer.is_connected(spec.worker_id)
    finally:
        peer.stop()


@pytest.mark.timeout(90)
def test_peer_killed_before_write_fails_fast_and_agent_keeps_working(
    transfer_writer: TransferAgent, transfer_live_peer: PeerProcess
) -> None:
    victim_spec = replace(SPEC, worker_id="decode-victim")
    victim = PeerProcess(victim_spec)
    victim_id = transfer_writer.connect(victim.descriptor)
    live_id = transfer_writer.connect(transfer_live_peer.descriptor)
    transfer_writer.write_pages(victim_id, [0], [0], b"first", "req-1")
    assert victim.next_notification().message == b"first"

    victim.kill()
    started = time.monotonic()
    with pytest.raises(TransferFailed) as info:
        transfer_writer.write_pages(victim_id, [1, 2], [5, 9], b"lost", "req-2", timeout_s=3.0)
    assert time.monotonic() - started < 3.5
    assert info.value.request_id == "req-2" and info.value.page_ids == [5, 9]
    assert transfer_writer.counters.num_failures == 1
    assert not transfer_writer.is_connected(victim_id)
    with pytest.raises(UnknownPeer):
        transfer_writer.write_pages(victim_id, [1], [5], b"lost", "req-3")

    transfer_writer.write_pages(live_id, [4], [20], b"still-alive", "req-4")
    assert transfer_live_peer.next_notification().message == b"still-alive"

    # The victim restarts under the same worker id: a fresh descriptor reconnects.
    reborn = PeerProcess(victim_spec)
    try:
        transfer_writer.connect(reborn.descriptor)
        transfer_writer.write_pages(victim_id, [6], [7], b"reborn", "req-5")
        note = reborn.next_notification()
        assert note.message == b"reborn" and note.pool_at_notification is not None
        assert torch.equal(
            _bits(note.pool_at_notification[7]), _bits(transfer_writer.pool.tensor[6])
        )
    finally:
        reborn.stop()


@pytest.mark.timeout(90)
def test_peer_killed_while_writing_fails_within_timeout() -> None:
    # 1 MiB pages, 64 per side: each 64 MiB write takes several ms inside the
    # CMA copy, so the kill lands mid-write most of the time.
    spec = PeerSpec(
        worker_id="decode-big", page_size=256, num_layers=8, num_kv_heads=4, head_dim=64,
        dtype="bfloat16", num_pages=64, snapshot_on_notification=False,
    )
    pool = KVPool(spec.geometry, 64)
    pool.tensor.fill_(1.0)
    peer = PeerProcess(spec)
    with TransferAgent("prefill-big", pool, spec.model_fingerprint) as writer:
        peer_id = writer.connect(peer.descriptor)
        ids = list(range(64))
        writer.write_pages(peer_id, ids, ids, b"warm", "req-warm")
        killed_at: list[float] = []

        def kill() -> None:
            killed_at.append(time.monotonic())
            os.kill(peer.pid, signal.SIGKILL)

        timer = threading.Timer(0.3, kill)
        timer.start()
        timeout_s = 2.0
        num_ok = 0
        try:
            with pytest.raises(TransferFailed):
                give_up = time.monotonic() + 20
                while time.monotonic() < give_up:
                    writer.write_pages(peer_id, ids, ids, b"n", f"req-{num_ok}", timeout_s)
                    num_ok += 1
        finally:
            timer.cancel()
            peer.kill()
        assert killed_at, "the peer was never killed"
        assert time.monotonic() - killed_at[0] < timeout_s + 1.0
        assert num_ok >= 1
        assert writer.counters.num_failures == 1
        assert not writer.is_connected(peer_id)


@pytest.mark.timeout(60)
def test_stalled_peer_times_out_then_recovers(transfer_writer: TransferAgent) -> None:
    spec = replace(SPEC, worker_id="decode-stalled")
    peer = PeerProcess(spec)
    try:
        # Stopped before first contact, the peer cannot answer the UCX wire-up,
        # so the write stays in progress until the timeout.
        os.kill(peer.pid, signal.SIGSTOP)
        peer_id = transfer_writer.connect(peer.descriptor)
        started = time.monotonic()
        with pytest.raises(TransferFailed, match="not complete after 1.000 s"):
            transfer_writer.write_pages(peer_id, [0], [0], b"late", "req-late", timeout_s=1.0)
        assert 1.0 <= time.monotonic() - started < 2.5
        os.kill(peer.pid, signal.SIGCONT)
        assert not peer.has_message(0.5), "an aborted write must not notify"

        transfer_writer.connect(peer.descriptor)
        transfer_writer.write_pages(peer_id, [1], [1], b"on-time", "req-ok")
        assert peer.next_notification().message == b"on-time"
    finally:
        os.kill(peer.pid, signal.SIGCONT)
        peer.stop()


@pytest.mark.timeout(30)
async def test_idle_notification_wait_uses_little_cpu(transfer_writer: TransferAgent) -> None:
    cpu_before, wall_before = time.process_time(), time.monotonic()
    assert await transfer_writer.wait_notifications(timeout_s=1.0) == []
    cpu_s, wall_s = time.process_time() - cpu_before, time.monotonic() - wall_before
    assert wall_s >= 1.0
    # Backing off to 5 ms sleeps: ~200 polls/s. A busy spin would be ~1.0 CPU-s/s.
    assert cpu_s / wall_s < 0.10, f"idle wait used {cpu_s / wall_s:.1%} of a core"
