"""The simulated prefill pool: one FCFS work queue shared by every prefill instance
(the JetStream `splitserve.prefill.shared.*` subjects), each instance serving one job at
a time.

What happens to an offloaded request:
1. its decode instance publishes a job (the request stays counted there as a pending
   remote prefill, so that instance cannot drain away under it);
2. the job waits in the queue until an instance is free (`prefill_queue_depth`, which
   the offload rule reads, is queued + in progress);
3. the instance fetches it (`queue_overhead_ms`) and prefills the prompt alone
   (`prefill_ms`): no batching of jobs, which is pessimistic for short prompts whose
   steps would share the token budget;
4. the KV is written into the decode instance (`transfer_ms`) and KVReady follows
   (`remote_overhead_ms`: publish + notification); the decode instance then has the
   first token and the sequence joins its batch.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from splitserve.planner.profile import Profile
from splitserve.planner.sim_decode import DecodeInstance, Seq


@dataclass
class Job:
    seq: Seq
    decode: DecodeInstance
    queued_s: float


@dataclass
class PrefillWindow:
    prefill_tokens: int = 0
    busy_s: float = 0.0
    num_jobs: int = 0
    transfer_s: float = 0.0
    transfer_bytes: int = 0
    queue_ms: list[float] = field(default_factory=list)


class PrefillInstance:
    def __init__(self, iid: int) -> None:
        self.iid = iid
        self.job: Job | None = None
        self.serving = True  # False: draining, takes no new job
        self.window = PrefillWindow()

    @property
    def is_empty(self) -> bool:
        return self.job is None


class PrefillPool:
    """The queue and the instances serving it. `start` returns when the job's prefill
    ends; the event loop calls `finish` then."""

    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        self.queue: deque[Job] = deque()
        self.idle: list[PrefillInstance] = []  # serving and free
        self.num_busy = 0
        self.num_serving = 0

    @property
    def depth(self) -> int:
        """Jobs queued or in progress (what the offload rule reads)."""
        return len(self.queue) + self.num_busy

    def submit(self, job: Job, now: float) -> list[tuple[float, PrefillInstance]]:
        self.queue.append(job)
        return self._dispatch(now)

    def add_instance(self, instance: PrefillInstance,
                     now: float) -> list[tuple[float, PrefillInstance]]:
        instance.serving = True
        self.num_serving += 1
        if instance.job is None:
            self.idle.append(instance)
        return self._dispatch(now)

    def drain(self, instance: PrefillInstance) -> None:
        """No new job for `instance` (it finishes its current one)."""
        if not instance.serving:
            return
        instance.serving = False
        self.num_serving -= 1
        if instance in self.idle:
            self.idle.remove(instance)

    def finish(self, instance: PrefillInstance,
               now: float) -> tuple[Job, float, list[tuple[float, PrefillInstance]]]:
        """The job `instance` prefilled, when its KV lands at its decode instance, and
        the next jobs started."""
        job = instance.job
        assert job is not None, "finish of an idle prefill instance"
        instance.job = None
        self.num_busy -= 1
        transfer_s = self.profile.transfer_ms(job.seq.prompt) / 1e3
        window = instance.window
        window.transfer_s += transfer_s
        window.transfer_bytes += job.seq.prompt * self.profile.kv_bytes_per_token
        landed = now + transfer_s + self.profile.remote_overhead_ms / 1e3
        if instance.serving:
            self.idle.append(instance)
        return job, landed, self._dispatch(now)

    def _dispatch(self, now: float) -> list[tuple[float, PrefillInstance]]:
        started = []
        while self.queue and self.idle:
            instance = self.idle.pop()
            job = self.queue.popleft()
            instance.job = job
            self.num_busy += 1
            service_s = (self.profile.queue_overhead_ms
                         + self.profile.prefill_ms(job.seq.prompt)) / 1e3
            window = instance.window
            window.queue_ms.append((now - job.queued_s) * 1e3)
            window.prefill_tokens += job.seq.prompt
            window.busy_s += service_s
            window.num_jobs += 1
            started.append((now + service_s, instance))
        return started
