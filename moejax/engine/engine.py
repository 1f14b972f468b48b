"""The engine loop, the same for every executor: schedule -> execute -> update requests -> record.

The simulator is this loop with a SimExecutor and a virtual clock that advances by modelled time.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jax
import numpy as np

from moejax.config import ModelConfig
from moejax.engine.executor import Executor
from moejax.engine.kv_cache import KVCacheManager, kv_block_bytes, kv_capacity
from moejax.engine.metrics import SLO, StepRecord, summarize
from moejax.engine.plan import IterationPlan, StepResult
from moejax.engine.policies import make_policy
from moejax.engine.request import Request
from moejax.engine.sampling import RequestError, SamplingParams
from moejax.engine.scheduler import Scheduler, SchedulerConfig


class WallClock:
    def __init__(self):
        self._t0 = time.perf_counter()

    def now(self) -> float:
        return time.perf_counter() - self._t0

    def advance(self, seconds: float) -> None:
        pass  # real time advances by itself

    def wait_until(self, t: float) -> None:
        time.sleep(max(0.0, t - self.now()))


class VirtualClock:
    def __init__(self):
        self._t = 0.0

    def now(self) -> float:
        return self._t

    def advance(self, seconds: float) -> None:
        self._t += seconds

    def wait_until(self, t: float) -> None:
        self._t = max(self._t, t)


@dataclass
class StepOutput:
    plan: IterationPlan
    result: StepResult
    finished: list[Request]


@dataclass(frozen=True)
class Arrival:
    """A request of a workload: when it arrives and what it asks."""

    arrival_s: float
    prompt_token_ids: Sequence[int]
    params: SamplingParams


class Engine:
    def __init__(self, scheduler: Scheduler, executor: Executor, *, virtual_time: bool = False, seed: int = 0):
        self.scheduler = scheduler
        self.executor = executor
        self.config: ModelConfig = scheduler.model_config
        self.clock = VirtualClock() if virtual_time else WallClock()
        self.seed = seed
        self.steps: list[StepRecord] = []
        self.finished: list[Request] = []
        self._next_id = 0

    # --- requests -----------------------------------------------------------------------------------
    def add_request(self, prompt_token_ids: Sequence[int], params: SamplingParams | None = None, *,
                    request_id: int | None = None, arrival_time: float | None = None) -> Request:
        params = params or SamplingParams()
        ids = [int(t) for t in prompt_token_ids]
        if not ids:
            raise RequestError("prompt is empty")
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise RequestError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {self.config.vocab_size})")
        if request_id is None:
            request_id = self._next_id
        self._next_id = max(self._next_id, request_id + 1)
        seed = params.seed if params.seed is not None else (self.seed * 1_000_003 + request_id) % 2**32
        req = Request(request_id, ids, params, seed,
                      arrival_time=self.clock.now() if arrival_time is None else arrival_time)
        self.scheduler.add(req)
        return req

    def abort(self, request_id: int) -> Request | None:
        req = self.scheduler.abort(request_id, self.clock.now())
        if req is not None:
            self.finished.append(req)
        return req

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    # --- the loop -------------------------------------------------------------------------------------
    def step(self) -> StepOutput:
        plan = self.scheduler.schedule()
        if plan.is_empty and self.scheduler.has_unfinished and not plan.released:
            raise RuntimeError("the scheduler planned nothing while requests are unfinished")
        result = self.executor.execute(plan)
        self.clock.advance(result.elapsed_s)
        now = self.clock.now()
        finished = self.scheduler.update(plan, result, now)
        self.finished.extend(finished)
        if not plan.is_empty:
            self.steps.append(StepRecord(now, result.elapsed_s, plan.num_tokens, plan.num_prefill_tokens,
                                         result.layer_stats.total_expert_bytes, result.energy_j))
        return StepOutput(plan, result, finished)

    def run(self, arrivals: Sequence[Arrival], *, progress: bool = False,
            on_step: Callable[[StepOutput], None] | None = None) -> list[Request]:
        """Serve a workload: requests join at their arrival times (on this engine's clock, from now)."""
        pending = sorted(arrivals, key=lambda a: a.arrival_s)
        t0 = self.clock.now()
        requests: list[Request] = []
        bar = _progress(len(pending)) if progress else None
        with bar or contextlib.nullcontext():
            task = bar.add_task("requests", total=len(pending)) if bar else None
            i = 0
            while i < len(pending) or self.has_unfinished:
                now = self.clock.now()
                due = self._agree(sum(1 for a in pending[i:] if t0 + a.arrival_s <= now))
                for a in pending[i:i + due]:
                    requests.append(self.add_request(a.prompt_token_ids, a.params, arrival_time=t0 + a.arrival_s))
                i += due
                if not self.has_unfinished:
                    self.clock.wait_until(t0 + pending[i].arrival_s)
                    continue
                out = self.step()
                if bar and out.finished:
                    bar.advance(task, len(out.finished))
                if on_step:
                    on_step(out)
        return requests

    def _agree(self, due: int) -> int:
        """How many arrivals to admit now. Processes of a multi-host run read their own clocks; they
        must plan the same iterations, so process 0's count is everyone's."""
        if jax.process_count() == 1 or isinstance(self.clock, VirtualClock):
            return due
        from jax.experimental import multihost_utils

        return int(multihost_utils.broadcast_one_to_all(np.int32(due)))

    def metrics(self, requests: list[Request], slo: SLO = SLO()) -> dict:
        steps = [s for s in self.steps if s.time >= min((r.arrival_time for r in requests), default=0.0)]
        return summarize(requests, steps, slo)


def _progress(total: int):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    transient=True)


# --- construction -------------------------------------------------------------------------------------

def default_kv_budget() -> int:
    """Bytes for the KV cache: 85% of what this process's first device has free (the least over all
    processes: they must size the same cache), or 512 MiB on CPU."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        free = int(0.85 * (stats["bytes_limit"] - stats.get("bytes_in_use", 0)))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            free = int(multihost_utils.process_allgather(np.int64(free)).min())
        return free
    return 512 << 20


def real_engine(model, *, policy: str = "chunked", token_budget: int = 512, max_num_seqs: int = 256,
                max_model_len: int | None = None, block_size: int = 16, num_blocks: int | None = None,
                kv_budget_bytes: int | None = None, seed: int = 0, **policy_kwargs) -> Engine:
    """An engine running `model` on its devices. KV capacity: `num_blocks`, else as many blocks as
    fit `kv_budget_bytes` (default: free device memory), but no more than max_num_seqs full requests."""
    from moejax.engine.jax_executor import JaxExecutor

    cfg = model.config
    max_model_len = max_model_len or min(cfg.max_position, 4096)
    shards = model.placement.shards("batch") if model.placement else 1
    if num_blocks is None:
        wanted = max_num_seqs * math.ceil(max_model_len / block_size)
        budget = kv_budget_bytes if kv_budget_bytes is not None else default_kv_budget()
        num_blocks = min(wanted, kv_capacity(cfg, block_size, min(budget, wanted * kv_block_bytes(cfg, block_size))))
        num_blocks = max(shards, num_blocks - num_blocks % shards)
    kv = KVCacheManager(num_blocks, block_size, num_shards=shards)
    scheduler = Scheduler(cfg, kv, make_policy(policy, **policy_kwargs),
                          SchedulerConfig(max_num_seqs=max_num_seqs, token_budget=token_budget,
                                          max_model_len=max_model_len))
    kept = getattr(scheduler.policy, "max_kept_rows", lambda _: 0)(max_model_len)
    return Engine(scheduler, JaxExecutor(model, num_blocks, block_size, max_model_len, kept), seed=seed)
