"""The transfer layer's test-only fault hook (`TransferAgent(fail_every=N)`), over real
NIXL/UCX: a receiver in its own process (transfer_peer.py), no fakes.

The chaos suite relies on three properties: the failure looks exactly like a real one
(same error, same counter, peer dropped), it happens before anything is posted (no
data and no notification reach the peer), and the schedule is every N-th write.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import torch
from transfer_peer import SENTINEL, PeerProcess, PeerSpec

from splitserve.engine.kv_pool import KVPool
from splitserve.transfer import InvalidPageIds, TransferAgent, TransferFailed

# float32, 2 layers, 2 KV heads, head_dim 8, 4 tokens: 1 KiB per page.
SPEC = PeerSpec(worker_id="decode-faults", num_pages=32)
WRITER_PAGES = 16


@pytest.fixture
def faults_peer() -> Iterator[PeerProcess]:
    peer = PeerProcess(SPEC)
    yield peer
    peer.stop()


def _writer(fail_every: int) -> TransferAgent:
    pool = KVPool(SPEC.geometry, WRITER_PAGES)
    pool.tensor.copy_(torch.randn(pool.tensor.shape, generator=torch.Generator().manual_seed(5)))
    # A fresh name per test: peers keep per-name state for writers they have seen.
    return TransferAgent(f"prefill-{uuid.uuid4().hex[:8]}", pool, SPEC.model_fingerprint,
                         fail_every=fail_every)


@pytest.mark.timeout(90)
async def test_every_third_write_fails_before_posting(faults_peer: PeerProcess) -> None:
    with _writer(fail_every=3) as writer:
        expected = torch.full((SPEC.num_pages, *SPEC.geometry.page_shape), SENTINEL)
        failed: list[int] = []
        for index in range(7):
            local_ids = [index, index + 8]
            remote_ids = [4 * index, 4 * index + 1]
            peer_id = writer.connect(faults_peer.descriptor)  # reconnects after a failure
            if index == 4:
                # Refused page ids post nothing and are not a write: the schedule holds.
                with pytest.raises(InvalidPageIds):
                    await writer.write_pages_async(peer_id, [0], [SPEC.num_pages], b"x", "bad")
            message = f"KVReady:req-{index}".encode()
            try:
                await writer.write_pages_async(peer_id, local_ids, remote_ids, message,
                                               f"req-{index}")
            except TransferFailed as exc:
                failed.append(index)
                assert exc.request_id == f"req-{index}" and exc.page_ids == remote_ids
                assert "injected fault" in exc.reason and peer_id in exc.reason
                # handled as a real failure: the connection is dropped
                assert not writer.is_connected(peer_id)
                assert not faults_peer.has_message(0.3), "a failed write must not notify"
                continue
            expected[remote_ids] = writer.pool.tensor[local_ids]
            note = faults_peer.next_notification()
            assert note.message == message and note.pool_at_notification is not None
            # Bit for bit: written pages landed, and the pages of failed writes still
            # hold the sentinel (nothing was posted for them).
            assert torch.equal(note.pool_at_notification.view(torch.int32),
                               expected.view(torch.int32))

        assert failed == [2, 5]
        counters = writer.counters
        assert (counters.num_failures, counters.num_transfers) == (2, 5)
        assert counters.num_bytes == 5 * 2 * SPEC.geometry.bytes_per_page


@pytest.mark.timeout(60)
def test_fail_every_one_fails_all_and_zero_none(faults_peer: PeerProcess) -> None:
    with _writer(fail_every=1) as writer:
        for index in range(2):
            peer_id = writer.connect(faults_peer.descriptor)
            with pytest.raises(TransferFailed, match="injected fault"):
                writer.write_pages(peer_id, [index], [index], b"never", f"req-{index}")
        assert (writer.counters.num_failures, writer.counters.num_transfers) == (2, 0)
        # The attribute may be changed on a live agent: 0 turns the faults off.
        writer.fail_every = 0
        peer_id = writer.connect(faults_peer.descriptor)
        writer.write_pages(peer_id, [3], [3], b"lands", "req-ok")
        note = faults_peer.next_notification()
        assert note.message == b"lands" and note.pool_at_notification is not None
        assert torch.equal(note.pool_at_notification[3], writer.pool.tensor[3])
        assert bool((note.pool_at_notification[:3] == SENTINEL).all())


def test_negative_fail_every_is_refused() -> None:
    pool = KVPool(SPEC.geometry, 1)
    with pytest.raises(ValueError, match="fail_every must be >= 0"):
        TransferAgent("prefill-neg", pool, SPEC.model_fingerprint, fail_every=-1)
