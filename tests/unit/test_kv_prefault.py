"""The KV pool's memory is faulted in by `KVPool.prefault` without changing its contents,
and the engine does it at start as `kv_prefault` says."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import torch

from splitserve.engine.kv_pool import KVPool, PageGeometry
from splitserve.engine.sampling import SamplingParams


def _rss_bytes() -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) << 10  # type: ignore[union-attr]


def test_prefault_populates_the_pool_and_keeps_its_contents() -> None:
    pool = KVPool(PageGeometry(16, 4, 2, 64, torch.float32), 2048)  # 128 MiB
    pool.tensor[5].fill_(3.0)  # written before: kept
    before = _rss_bytes()
    populated = pool.prefault(chunk_bytes=16 << 20)
    assert populated >= pool.nbytes  # the whole mapping (incl. its alignment slack)
    # resident now: at least 90% of the pool more than before (pages 0-5 were already)
    assert _rss_bytes() - before >= 0.9 * (pool.nbytes - 6 * pool.geometry.bytes_per_page)
    assert bool((pool.tensor[5] == 3.0).all()) and float(pool.tensor[6:].abs().sum()) == 0.0


@pytest.mark.parametrize("mode", ["sync", "background", "off"])
def test_engine_prefaults_as_configured(tiny_engine, mode: str) -> None:
    before = _rss_bytes()
    engine = tiny_engine(kv_prefault=mode, num_pages=16384)  # 128 MiB of tiny-model KV
    size = engine.pool.nbytes
    deadline = time.monotonic() + 60
    while mode == "background" and _rss_bytes() - before < 0.9 * size:
        assert time.monotonic() < deadline, "the background prefault did not finish"
        time.sleep(0.05)
    grown = _rss_bytes() - before
    assert grown >= 0.9 * size if mode != "off" else grown < 0.5 * size, (grown, size)
    out = engine.generate([[1, 2, 3]], SamplingParams(max_tokens=3, temperature=0))
    assert len(out[0]) == 3
