"""Page-id validation and coalescing of page runs into transfer descriptors.

A page is one contiguous block of `bytes_per_page` bytes at `base + id * bytes_per_page`,
so a run of pages whose local and remote ids both increase by one together is one
contiguous block on each side and moves as a single descriptor.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from splitserve.transfer.errors import InvalidPageIds

PageRun = tuple[int, int, int]
"""(local_start, remote_start, num_pages)"""


def coalesce_page_runs(local_ids: Sequence[int], remote_ids: Sequence[int]) -> list[PageRun]:
    """Group paired page ids into maximal runs, preserving order.

    `coalesce_page_runs([4, 5, 6, 9], [0, 1, 2, 3])` is `[(4, 0, 3), (9, 3, 1)]`.
    The inputs must have equal length (see `validate_page_ids`).
    """
    runs: list[PageRun] = []
    if not local_ids:
        return runs
    local_start, remote_start, num_pages = local_ids[0], remote_ids[0], 1
    for local_id, remote_id in zip(local_ids[1:], remote_ids[1:]):
        if local_id == local_start + num_pages and remote_id == remote_start + num_pages:
            num_pages += 1
            continue
        runs.append((local_start, remote_start, num_pages))
        local_start, remote_start, num_pages = local_id, remote_id, 1
    runs.append((local_start, remote_start, num_pages))
    return runs


def validate_page_ids(
    request_id: str,
    local_ids: Sequence[int],
    remote_ids: Sequence[int],
    num_local_pages: int,
    num_remote_pages: int,
) -> tuple[list[int], list[int]]:
    """Check a transfer's page ids before anything is posted; returns them as int lists.

    Refused: empty or unequal lists, ids outside `[0, num_pages)` on either side,
    and a remote page addressed twice (two sources for one destination is a bug
    in the caller, never a valid request).
    """
    local = [int(i) for i in local_ids]
    remote = [int(i) for i in remote_ids]
    if len(local) != len(remote):
        raise InvalidPageIds(
            request_id, f"{len(local)} local ids but {len(remote)} remote ids", remote
        )
    if not local:
        raise InvalidPageIds(request_id, "no pages to transfer")
    bad_local = [i for i in local if not 0 <= i < num_local_pages]
    if bad_local:
        raise InvalidPageIds(
            request_id, f"local ids out of range [0, {num_local_pages}): {bad_local[:8]}", local
        )
    bad_remote = [i for i in remote if not 0 <= i < num_remote_pages]
    if bad_remote:
        raise InvalidPageIds(
            request_id,
            f"remote ids out of range [0, {num_remote_pages}): {bad_remote[:8]}",
            remote,
        )
    if len(set(remote)) != len(remote):
        dups = sorted(i for i, n in Counter(remote).items() if n > 1)
        raise InvalidPageIds(request_id, f"remote ids addressed twice: {dups[:8]}", remote)
    return local, remote


def format_page_ids(page_ids: Sequence[int], max_ranges: int = 16) -> str:
    """Compact page ids for logs: `[0, 1, 2, 7, 9, 10]` is `"0-2,7,9-10"`."""
    ranges: list[str] = []
    index = 0
    while index < len(page_ids):
        end = index
        while end + 1 < len(page_ids) and page_ids[end + 1] == page_ids[end] + 1:
            end += 1
        first, last = page_ids[index], page_ids[end]
        ranges.append(str(first) if first == last else f"{first}-{last}")
        index = end + 1
    if len(ranges) > max_ranges:
        return ",".join(ranges[:max_ranges]) + f",...({len(page_ids)} pages)"
    return ",".join(ranges)
