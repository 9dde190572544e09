"""The chaos suite (issue 9) as an acceptance test: `benchmarks/chaos.py --json
--requests 50` over a real local cluster, one row per fault. Every row must have no
lost, wrong or duplicated request and no leaked page, and show the evidence that its
fault actually struck (the counters it must move). The run takes ~5 min on 2 cores.

The fast tests at the end check the suite's own verdicts on made-up outcomes."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
CHAOS = BENCHMARKS / "chaos.py"
FAULTS = ("duplicate_ids", "invalid_reload", "prefill_stop", "prefill_kill", "nats_restart",
          "decode_restart_same_id", "two_prefill_one_killed", "transfer_failure",
          "clock_offset_behind", "clock_offset_ahead", "corrupt_page", "pool_exhausted",
          "nats_node_kill")
NUM_REQUESTS = 50
F = TypeVar("F", bound=Callable[..., None])


def chaos_run(test: F) -> F:
    """A test on the rows of the one chaos run (the first one to run waits for it)."""
    return pytest.mark.slow(pytest.mark.timeout(1500)(test))  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    workdir = tmp_path_factory.mktemp("chaos")
    run = subprocess.run([sys.executable, str(CHAOS), "--json", "--requests", str(NUM_REQUESTS),
                          "--workdir", str(workdir)],
                         capture_output=True, text=True, timeout=1400, check=False)
    assert run.stdout.strip(), f"no JSON (exit {run.returncode}):\n{run.stderr[-5000:]}"
    result = json.loads(run.stdout.strip().splitlines()[-1])
    by_fault = {row["fault"]: row for row in result["rows"]}
    # the exit status says the same as the rows
    failed = any(row.get("error") or any(row.get(k) for k in
                                         ("lost", "wrong", "duplicated", "leaked_pages"))
                 for row in result["rows"])
    assert run.returncode == (1 if failed else 0), run.stderr[-5000:]
    return by_fault


def _explain(row: dict) -> str:
    keys = ("failures", "notes", "counters", "evidence", "error")
    return json.dumps({k: row.get(k) for k in keys}, indent=1)


def _counter(row: dict, role: str, name: str) -> int:
    return int(row["counters"].get(role, {}).get(name, 0))


@chaos_run
@pytest.mark.parametrize("fault", FAULTS)
def test_no_request_lost_wrong_duplicated_and_no_page_leaked(rows, fault) -> None:
    assert fault in rows, f"no row for {fault}"
    row = rows[fault]
    assert "error" not in row, _explain(row)
    assert row["requests"] >= NUM_REQUESTS
    assert (row["lost"], row["wrong"], row["duplicated"]) == (0, 0, 0), _explain(row)
    assert row["completed"] == row["requests"], _explain(row)
    assert row["leaked_pages"] == 0, _explain(row)
    assert row["prefill_pages_used"] == 0, _explain(row)
    assert row["long"] > 0 and row["sampled"] > 0


@chaos_run
@pytest.mark.parametrize("fault", ["prefill_kill", "prefill_stop", "two_prefill_one_killed",
                                   "nats_restart", "nats_node_kill", "decode_restart_same_id",
                                   "transfer_failure", "corrupt_page"])
def test_remote_prefill_resumes_after_the_fault(rows, fault) -> None:
    """Requests sent once the fault is over are prefilled remotely again."""
    row = rows[fault]
    assert row["remote_after_fault"] >= 1, _explain(row)


@chaos_run
@pytest.mark.parametrize(("fault", "evidence"), [
    ("prefill_kill", "jobs_in_flight_at_fault"), ("prefill_stop", "jobs_in_flight_at_fault"),
    ("two_prefill_one_killed", "jobs_in_flight_at_fault"),
    ("nats_node_kill", "jobs_in_flight_at_fault"), ("nats_restart", "jobs_queued_at_fault"),
    ("decode_restart_same_id", "jobs_queued_at_fault")])
def test_the_fault_struck_with_jobs_in_flight(rows, fault, evidence) -> None:
    row = rows[fault]
    assert row["evidence"].get(evidence, 0) >= 1, _explain(row)


@chaos_run
def test_decode_restart_fences_the_previous_life(rows) -> None:
    row = rows["decode_restart_same_id"]
    fenced = (_counter(row, "prefill", "num_incarnation_mismatches")
              + _counter(row, "prefill", "num_expired_jobs"))
    assert fenced >= 1, _explain(row)
    assert row["errors_seen"].get("UNAVAILABLE", 0) >= 1, _explain(row)  # clients retried


@chaos_run
def test_duplicate_ids_are_refused_then_served(rows) -> None:
    row = rows["duplicate_ids"]
    assert row["duplicate_sends"] > 0
    assert row["refused"] >= row["duplicate_sends"], _explain(row)
    assert _counter(row, "decode", "num_duplicate_ids") >= row["duplicate_sends"], _explain(row)


@chaos_run
def test_invalid_reload_is_refused_and_changes_nothing(rows) -> None:
    reloads = rows["invalid_reload"]["evidence"]["reloads"]
    assert reloads
    for reload in reloads:
        assert reload["error"] and reload["config_unchanged"], reload


@chaos_run
def test_transfer_failures_are_retried(rows) -> None:
    row = rows["transfer_failure"]
    assert _counter(row, "prefill", "num_transfer_failures") >= 1, _explain(row)


@chaos_run
def test_corrupt_pages_fail_their_checksum(rows) -> None:
    row = rows["corrupt_page"]
    assert _counter(row, "decode", "num_checksum_failures") >= 1, _explain(row)


def _excluded(row: dict) -> bool:
    return any(c["excluded"] for c in row["evidence"]["peer_clocks"])


@chaos_run
def test_a_prefill_worker_behind_refuses_jobs_or_is_excluded(rows) -> None:
    """Behind, its lease checks would let it write late: it must not take jobs."""
    row = rows["clock_offset_behind"]
    assert _excluded(row) or _counter(row, "prefill", "num_clock_skew_jobs") >= 1, _explain(row)


@chaos_run
def test_a_prefill_worker_ahead_expires_jobs_or_is_excluded(rows) -> None:
    row = rows["clock_offset_ahead"]
    assert _excluded(row) or _counter(row, "prefill", "num_expired_jobs") >= 1, _explain(row)


@chaos_run
def test_nats_node_kill_took_the_stream_leader(rows) -> None:
    row = rows["nats_node_kill"]
    assert row["evidence"]["killed_node"], _explain(row)
    assert row["evidence"]["new_leader"] not in (None, row["evidence"]["killed_node"])


@chaos_run
def test_pool_exhausted_ran_with_the_pool_full(rows) -> None:
    evidence = rows["pool_exhausted"]["evidence"]
    assert evidence["peak_pages_held"] >= 0.8 * evidence["pages_total"], evidence


# --- the suite's own verdicts, on made-up outcomes (fast) ------------------------------

REFERENCE = [5, 6, 6, 7]


def _chaos_module(name: str) -> ModuleType:
    """A module of benchmarks/ (the suite's own code). benchmarks/ is on sys.path only
    while it imports: left there, its kernels.py would shadow the `kernels` package that
    transformers looks for (and then fails to import from) in later tests."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCHMARKS))


def _outcome(outputs: list, partials: list, duplicate: bool = False,
             num_refused: int = 0) -> Any:
    workload, client = _chaos_module("chaos_workload"), _chaos_module("chaos_client")
    request = workload.Request("r-1", (1, 2, 3), workload.Params(max_tokens=4),
                               duplicate=duplicate)
    outcome = client.Outcome(request, outputs=outputs, partials=partials,
                             num_refused=num_refused)
    outcome.lost_reason = "" if outputs else "no complete output in 120 s"
    return outcome


@pytest.mark.parametrize(("outputs", "partials", "kinds"), [
    ([[[5], [6], [6], [7]]], [], set()),  # a token repeated by the model is no duplicate
    ([[[5], [6, 6, 7]]], [[[5], [6]]], set()),  # cut, retried: the cut part was right
    ([], [], {"lost"}),
    ([[[5], [6], [6], [8]]], [], {"wrong"}),
    ([[[5, 6, 6, 7]]], [[[5], [9]]], {"wrong"}),  # a cut stream delivered a wrong token
    ([[[5, 6, 6, 7]], [[5, 6, 6, 7]]], [], {"duplicated"}),
    ([[[5], [6], [6], [6], [7]]], [], {"duplicated"}),  # chunk [6] sent twice
])
def test_verdict(outputs, partials, kinds) -> None:
    report = _chaos_module("chaos_report")
    got = {kind for kind, _ in report.verdict(_outcome(outputs, partials), REFERENCE)}
    assert got == kinds


def test_verdict_on_a_duplicate_send_that_was_not_refused() -> None:
    report = _chaos_module("chaos_report")
    served = _outcome([[[5, 6, 6, 7]]], [], duplicate=True, num_refused=0)
    refused_then_served = _outcome([[[5, 6, 6, 7]]], [], duplicate=True, num_refused=1)
    assert [k for k, _ in report.verdict(served, REFERENCE)] == ["duplicated"]
    assert report.verdict(refused_then_served, REFERENCE) == []


def test_read_stream_flags_chunks_after_the_end_and_other_ids() -> None:
    client = _chaos_module("chaos_client")
    from splitserve.rpc import generation_pb2 as pb

    request = _outcome([], []).request
    chunks = [pb.GenerateChunk(request_id="r-1", token_ids=[5, 6]),
              pb.GenerateChunk(request_id="r-1", token_ids=[6, 7],
                               finish_reason=pb.FINISH_REASON_LENGTH),
              pb.GenerateChunk(request_id="r-2", token_ids=[8])]
    stream = client.read_stream(chunks, request)
    assert stream.complete and stream.misrouted
    assert stream.duplicates == ["chunk 2 after the final chunk", "5 tokens > max_tokens 4"]
