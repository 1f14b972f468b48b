"""The engine loop, the same for every executor: schedule -> execute -> update requests -> record.

The simulator is this loop with a SimExecutor and a virtual clock that advances by modelled time.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jax
import numpy as np

from moejax.config import ModelConfig
from moejax.engine.executor import Executor
from moejax.engine.kv_transfer import Handoff
from moejax.engine.metrics import SLO, StepRecord, summarize
from moejax.engine.plan import IterationPlan, StepResult
from moejax.engine.request import Request
from moejax.engine.sampling import RequestError, SamplingParams
from moejax.engine.scheduler import Scheduler


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
        self.handoffs: list[Handoff] = []  # requests handed off after their prefill, with their KV
        self._next_id = 0

    # --- requests -----------------------------------------------------------------------------------
    def add_request(self, prompt_token_ids: Sequence[int], params: SamplingParams | None = None, *,
                    request_id: int | None = None, arrival_time: float | None = None,
                    handoff: bool = False) -> Request:
        """Queue a request. handoff: prefill it here, then finish it with reason "handoff" and its
        KV in `engine.handoffs`, for another engine to continue (`add_prefilled`)."""
        params = params or SamplingParams()
        ids = self._checked_tokens(prompt_token_ids, "prompt")
        request_id = self._new_id(request_id)
        seed = params.seed if params.seed is not None else (self.seed * 1_000_003 + request_id) % 2**32
        req = Request(request_id, ids, params, seed,
                      arrival_time=self.clock.now() if arrival_time is None else arrival_time, handoff=handoff)
        self.scheduler.add(req)
        return req

    def add_prefilled(self, handoff: Handoff, *, request_id: int | None = None) -> Request:
        """Continue a request another engine prefilled: its KV is imported into this engine's blocks
        and it goes straight to decode (same sampling seed, so it draws what one engine would). Ids
        are per engine: it gets a new one here unless `request_id` is given."""
        prompt = self._checked_tokens(handoff.prompt_token_ids, "prompt")
        outputs = self._checked_tokens(handoff.output_token_ids, "output")
        if not outputs:
            raise RequestError(f"request {handoff.request_id}: a hand-off carries the prefill's first token; none given")
        handoff.kv.check(self.config, self.executor.kv_dtype, len(prompt) + len(outputs) - 1)
        req = Request(self._new_id(request_id), prompt,
                      handoff.params, handoff.seed, arrival_time=handoff.arrival_time,
                      token_ids=prompt + outputs, num_computed_tokens=len(prompt) + len(outputs) - 1)
        req.first_token_time = handoff.first_token_time
        self.scheduler.add(req, kv=handoff.kv)
        return req

    def _checked_tokens(self, token_ids: Sequence[int], what: str) -> list[int]:
        ids = [int(t) for t in token_ids]
        if what == "prompt" and not ids:
            raise RequestError("prompt is empty")
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise RequestError(f"{what} token ids {bad[:5]} are outside the vocabulary [0, {self.config.vocab_size})")
        return ids

    def _new_id(self, request_id: int | None) -> int:
        if request_id is None:
            request_id = self._next_id
        self._next_id = max(self._next_id, request_id + 1)
        return request_id

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
        for req in list(self.scheduler.handed_off):
            self._hand_off(req)
        if not plan.is_empty:
            self.steps.append(StepRecord(now, result.elapsed_s, plan.num_tokens, plan.num_prefill_tokens,
                                         result.expert_bytes, result.energy_j))
        return StepOutput(plan, result, finished)

    def _hand_off(self, req: Request) -> None:
        """Export a handed-off request's KV (all but its last token: the next engine computes that one)."""
        kv = self.executor.export_kv(req.block_ids, req.num_computed_tokens, req.state_slot)
        self.handoffs.append(Handoff(req.request_id, list(req.prompt_token_ids), req.output_token_ids, req.params,
                                     req.seed, kv, req.arrival_time, req.first_token_time))
        self.scheduler.release_handoff(req)

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
