"""The chaos suite's verdicts: what each logical request got against its reference, one
row per fault, and the table on stderr."""

from __future__ import annotations

from collections import Counter
from typing import Any

from chaos_client import Outcome
from chaos_workload import Params

MAX_FAILURES_LISTED = 10
ReferenceMap = dict[tuple[tuple[int, ...], Params], list[int]]
JsonRow = dict[str, Any]  # one row of the output


def verdict(outcome: Outcome, reference: list[int]) -> list[tuple[str, str]]:
    """Why this logical request failed, as (kind, description) with kind lost, wrong
    or duplicated; [] when it did not."""
    bad: list[tuple[str, str]] = []
    r = outcome.request
    if not outcome.outputs:
        bad.append(("lost", f"{outcome.lost_reason}; calls ended {outcome.errors}"))
    repeats, wrong = list(outcome.stream_duplicates), []
    streams = [(c, True) for c in outcome.outputs] + [(c, False) for c in outcome.partials]
    for chunks, complete in streams:
        tokens = _flat(chunks)
        if tokens == (reference if complete else reference[:len(tokens)]):
            continue
        if why := _repeated_chunk(chunks, reference):
            repeats.append(why)  # more delivered than generated: duplicated, not wrong
            continue
        at = next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b),
                  min(len(tokens), len(reference)))
        wrong.append(f"got {tokens} want {reference} (first difference at token {at}; "
                     f"{'complete output' if complete else 'partial stream'}; prefill "
                     f"{outcome.prefill or '?'}, {outcome.num_attempts} attempt(s))")
    if outcome.misrouted:
        wrong.append("a chunk named another request id")
    if wrong:
        bad.append(("wrong", "; ".join(wrong)))
    if len(outcome.outputs) > 1:
        bad.append(("duplicated", f"{len(outcome.outputs)} complete outputs"))
    if repeats:
        bad.append(("duplicated", "; ".join(repeats)))
    if r.duplicate and outcome.outputs and outcome.num_refused == 0:
        bad.append(("duplicated", "served while its original was in flight"))
    return bad


def _flat(chunks: list[list[int]]) -> list[int]:
    return [t for chunk in chunks for t in chunk]


def _repeated_chunk(chunks: list[list[int]], reference: list[int]) -> str:
    """A chunk sent twice: without a chunk equal to the one before it, the stream
    would match (a prefix of) the reference ("" when there is no such chunk)."""
    for i in range(1, len(chunks)):
        if chunks[i] and chunks[i] == chunks[i - 1]:
            rest = _flat(chunks[:i] + chunks[i + 1:])
            if rest == reference[:len(rest)]:
                return f"chunk {i} repeats chunk {i - 1}"
    return ""


def summarize(outcomes: list[Outcome], references: ReferenceMap,
              fault_s: float | None, fault_end_s: float | None) -> JsonRow:
    verdicts = [(o.request, verdict(o, references[o.request.key])) for o in outcomes]

    def count(kind: str) -> int:
        return sum(any(k == kind for k, _ in bad) for _, bad in verdicts)

    failures = [f"{r.request_id}{' (duplicate send)' if r.duplicate else ''}: {kind}: {text}"
                for r, bad in verdicts for kind, text in bad]

    done = [o for o in outcomes if o.done_s is not None]
    return {
        "requests": len(outcomes),
        "completed": sum(bool(o.outputs) for o in outcomes),
        "lost": count("lost"), "wrong": count("wrong"), "duplicated": count("duplicated"),
        "duplicate_sends": sum(o.request.duplicate for o in outcomes),
        "refused": sum(o.num_refused for o in outcomes if o.request.duplicate),
        "unexpected_refusals": sum(o.num_refused for o in outcomes if not o.request.duplicate),
        "incomplete_streams": sum(o.num_incomplete for o in outcomes),
        "retried_calls": sum(len(o.errors) + o.num_incomplete for o in outcomes),
        "errors_seen": dict(sorted(Counter(c for o in outcomes for c in o.errors).items())),
        "long": sum(o.request.is_long for o in outcomes),
        "remote": sum(o.prefill == "remote" for o in done),
        "multi_attempt": sum(o.num_attempts > 1 for o in done),
        "sampled": sum(o.request.params.seed is not None for o in outcomes),
        "recovery_s": _first_done_after(done, fault_s),
        "recovery_remote_s": _first_done_after([o for o in done if o.prefill == "remote"],
                                               fault_s),
        # requests sent once the fault was over that were prefilled remotely
        "remote_after_fault": sum(o.prefill == "remote" for o in done
                                  if fault_end_s is not None and o.sent_s >= fault_end_s),
        "failures": failures[:MAX_FAILURES_LISTED],
    }


def _first_done_after(outcomes: list[Outcome], since_s: float | None) -> float | None:
    """Seconds from `since_s` to the first of `outcomes` completed after it."""
    if since_s is None:
        return None
    later = [o.done_s - since_s for o in outcomes if o.done_s is not None and o.done_s >= since_s]
    return round(min(later), 2) if later else None


COLUMNS = (("fault", 24), ("requests", 8), ("completed", 9), ("lost", 4), ("wrong", 5),
           ("duplicated", 10), ("leaked_pages", 12), ("refused", 7), ("remote", 6),
           ("recovery_s", 10), ("wall_s", 7))


def table(rows: list[JsonRow]) -> str:
    lines = ["  ".join(f"{name:>{width}}" if i else f"{name:<{width}}"
                       for i, (name, width) in enumerate(COLUMNS))]
    for row in rows:
        cells = []
        for i, (name, width) in enumerate(COLUMNS):
            value = row.get(name)
            text = "-" if value is None else str(value)
            cells.append(f"{text:>{width}}" if i else f"{text:<{width}}")
        lines.append("  ".join(cells))
        for failure in row.get("failures", []):
            lines.append(f"    ! {failure}")
        if row.get("error"):
            lines.append(f"    ! row error: {row['error']}")
    return "\n".join(lines)


def is_failed(row: JsonRow) -> bool:
    return bool(row.get("error")) or any(
        int(row.get(k) or 0) > 0 for k in ("lost", "wrong", "duplicated", "leaked_pages"))
