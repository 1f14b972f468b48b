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
from moejax.engine.sampling import RequestError, SamplingParams, check_token_ids
from moejax.engine.scheduler import Scheduler

# The longest a multi-step decode iteration is planned to take (at the last measured step time): a
# request arriving meanwhile waits about this long (twice with run-ahead), a stream as long between deltas.
MAX_ITERATION_S = 0.25


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


class StepError(RuntimeError):
    """The executor failed on an iteration: `request_ids` are the requests it was running (the engine
    is otherwise intact; a server finishes those requests with an error and goes on)."""

    def __init__(self, request_ids: list[int], cause: BaseException):
        super().__init__(f"the executor failed on an iteration of requests {request_ids}: {cause!r}")
        self.request_ids = request_ids


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
    def __init__(self, scheduler: Scheduler, executor: Executor, *, virtual_time: bool = False, seed: int = 0,
                 run_ahead: bool = True, max_iteration_s: float = MAX_ITERATION_S):
        """run_ahead: a multi-step decode iteration dispatches the next one before its own tokens are
        back (step()). max_iteration_s: a multi-step decode runs no more steps than fit in this time at
        the last measured step time (step())."""
        self.scheduler = scheduler
        self.executor = executor
        self.config: ModelConfig = scheduler.model_config
        self.clock = VirtualClock() if virtual_time else WallClock()
        self.seed = seed
        self.steps: list[StepRecord] = []
        self.finished: list[Request] = []
        self.handoffs: list[Handoff] = []  # requests handed off after their prefill, with their KV
        self._next_id = 0
        self._decode_step_s: float | None = None  # time per decode step, of the last decode-only iteration
        self.run_ahead = run_ahead
        self.max_iteration_s = max_iteration_s
        self._ahead = None  # (plan, launched): the iteration dispatched ahead, collected by the next step()

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

    def check_request(self, prompt_token_ids: Sequence[int], params: SamplingParams, *,
                      prompt_param: str = "prompt", max_tokens_param: str = "max_tokens") -> list[int]:
        """What every front end (LLM, CLI, HTTP) checks before queueing: integer token ids in the
        vocabulary, and a prompt plus max_tokens that fit max_model_len (never silently cut short).
        Errors name the front end's field (`prompt_param`, `max_tokens_param`)."""
        ids = self._checked_tokens(prompt_token_ids, prompt_param)
        limit = self.scheduler.config.max_model_len
        if len(ids) >= limit:
            raise RequestError(f"{prompt_param} of {len(ids)} tokens does not fit max_model_len={limit} (it must "
                               "leave room for one output token)", param=prompt_param)
        if len(ids) + params.max_tokens > limit:
            raise RequestError(f"{max_tokens_param}={params.max_tokens} with a prompt of {len(ids)} tokens exceeds "
                               f"max_model_len={limit}: at most {limit - len(ids)}", param=max_tokens_param)
        return ids

    def _checked_tokens(self, token_ids: Sequence[int], what: str) -> list[int]:
        ids = check_token_ids(token_ids, what, self.config.vocab_size)
        if what in ("prompt", "prompt_token_ids") and not ids:
            raise RequestError(f"{what} is empty", param=what)
        return ids

    def _new_id(self, request_id: int | None) -> int:
        if request_id is None:
            request_id = self._next_id
        self._next_id = max(self._next_id, request_id + 1)
        return request_id

    def abort(self, request_id: int) -> Request | None:
        """Finish an unfinished request with reason "abort" (its KV freed) -> it, or None when it had
        finished already. An id this engine never gave out is an error."""
        req = self.scheduler.abort(request_id, self.clock.now())
        if req is not None:
            self.finished.append(req)
        elif not 0 <= request_id < self._next_id:
            raise RequestError(f"abort: no request {request_id} on this engine (ids so far: 0 .. {self._next_id - 1})",
                               param="request_id")
        return req

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    # --- the loop -------------------------------------------------------------------------------------
    def step(self, until: float | None = None) -> StepOutput:
        """One iteration. A decode-only iteration runs several decode steps in one go (up to the
        executor's max_decode_steps, and as many as take max_iteration_s at the last measured step time:
        what a request arriving meanwhile waits, and a stream's longest wait between deltas); `until` (a
        time on this engine's clock, e.g. the next arrival) bounds them to what is expected to finish by
        then, so that new requests do not wait.

        Run-ahead: a multi-step decode dispatches the iteration after it
        (Scheduler.schedule_ahead: the same requests decoding on) before waiting for its own tokens,
        so the device computes while the host collects, updates requests and plans; the next call
        collects that one. Outputs are the same as without (a request that stopped meanwhile drops
        what it produced ahead); a request added meanwhile waits for the iteration run ahead, which
        `until` bounds like any other."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None and any(s.request_id in self.scheduler.requests for s in ahead[0].slices):
            plan, launched = ahead
        else:  # (nothing run ahead, or only for requests that have stopped or were aborted since)
            plan, launched = self.scheduler.schedule(self._decode_steps(until)), None
            if plan.is_empty and self.scheduler.has_unfinished and not plan.released:
                raise RuntimeError("the scheduler planned nothing while requests are unfinished")
        try:
            if plan.decode_steps > 1:  # executors that plan several steps launch them (Executor)
                launched = launched or self.executor.launch(plan)
                ahead = None
                if self.run_ahead:
                    ahead = self.scheduler.schedule_ahead(plan, self._decode_steps(until, after=plan.decode_steps))
                if ahead is not None:
                    self._ahead = (ahead, self.executor.launch(ahead, after=launched))
                result = self.executor.finish(launched)
            else:
                result = self.executor.execute(plan)
        except Exception as e:
            self._ahead = None  # its requests are this plan's: the StepError names them
            raise StepError(sorted({s.request_id for s in plan.slices}), e) from e
        self.clock.advance(result.elapsed_s)
        now = self.clock.now()
        for rid, logprobs in result.logprobs.items():  # before update: a request finishing now has them too
            req = self.scheduler.requests.get(rid)
            if req is not None:
                req.logprobs.append(logprobs)
        finished = self.scheduler.update(plan, result, now)
        self.finished.extend(finished)
        for req in list(self.scheduler.handed_off):
            self._hand_off(req)
        if plan.decode_steps > 1:
            produced = sum(len(t) for t in result.sampled_steps.values())
            self._decode_step_s = result.elapsed_s / (produced / len(plan.slices))
        elif plan.slices and not plan.num_prefill_tokens:  # one decode step: its host work in, an upper bound
            self._decode_step_s = result.elapsed_s
        if not plan.is_empty:
            num_tokens = produced if plan.decode_steps > 1 else plan.num_tokens
            self.steps.append(StepRecord(now, result.elapsed_s, num_tokens, plan.num_prefill_tokens,
                                         result.expert_bytes, result.energy_j))
        return StepOutput(plan, result, finished)

    def _decode_steps(self, until: float | None, after: int = 0) -> int:
        """Decode steps the next iteration may run: the executor's most, and no more than the last
        measured step time fits in max_iteration_s, nor before `until`. after: decode steps that run
        before it starts (an iteration run ahead of one still running), so that a request arriving at
        `until` waits no longer than without run-ahead."""
        most, step_s = self.executor.max_decode_steps, self._decode_step_s
        if most == 1 or step_s is None:
            return 1 if until is not None else most  # with arrivals to come, one step at a time until measured
        most = max(1, min(most, int(self.max_iteration_s / step_s)))
        if until is None:
            return most
        start = self.clock.now() + after * step_s
        return max(1, min(most, int((until - start) / step_s)))

    def _hand_off(self, req: Request) -> None:
        """Export a handed-off request's KV (all but its last token: the next engine computes that one)."""
        kv = self.executor.export_kv(req.block_ids, req.num_computed_tokens, req.group_block_ids,
                                       req.state_slot)
        self.handoffs.append(Handoff(req.request_id, list(req.prompt_token_ids), req.output_token_ids, req.params,
                                     req.seed, kv, req.arrival_time, req.first_token_time))
        self.scheduler.release_handoff(req)

    def warmup(self, *, progress: bool = False, max_num_seqs: int | None = None) -> int:
        """Compile ahead what serving will meet, so that no request waits for a compiler: serve
        throwaway requests shaped to meet every (tokens, requests) bucket pair of an iteration up to
        the token budget and max_num_seqs (each pair one program), then their decode steps. Covers
        what chunked and whole-prompt iterations need; a layered policy's layer groups meet further
        shapes, compiled when first met. max_num_seqs: the most requests at once to warm up for
        (default and at most the scheduler's; a workload of fewer requests needs fewer programs).
        Returns the number of programs compiled."""
        from moejax.engine.compiles import count_compilations
        from moejax.engine.metadata import bucket

        if self.scheduler.has_unfinished:
            raise RuntimeError("warm up an engine before giving it requests")
        cfg, steps = self.scheduler.config, self.executor.max_decode_steps
        budget = min(cfg.token_budget, cfg.max_model_len - steps - 1)
        token_buckets = [b for b in (8 << i for i in range(32)) if b <= bucket(budget)]
        most = min(cfg.max_num_seqs, max_num_seqs or cfg.max_num_seqs)
        request_buckets = [b for b in (8 << i for i in range(32)) if b <= bucket(most)]
        cells = [(t, r) for t in token_buckets for r in request_buckets if r <= t]
        params = SamplingParams(max_tokens=2 * steps + 1, ignore_eos=True)  # a decode iteration, one ahead
        bar = _progress() if progress else None
        before = (len(self.steps), len(self.finished), self._next_id)
        with count_compilations() as compiled, bar or contextlib.nullcontext():
            task = bar.add_task("compiling", total=len(cells)) if bar else None
            for tokens, requests in cells:
                n = min(requests, most, tokens)
                total = min(tokens, budget)
                for i in range(n):  # n prompts of `total` tokens in all: one iteration of that bucket
                    length = total // n + (i < total % n)
                    self.add_request([(7 * i + j) % self.config.vocab_size for j in range(length)], params)
                while self.has_unfinished:
                    self.step()
                if bar:
                    bar.advance(task)
        del self.steps[before[0]:], self.finished[before[1]:]  # the throwaway requests leave no trace
        self._next_id = before[2]
        return compiled.count

    def run(self, arrivals: Sequence[Arrival], *, progress: bool | str = False,
            on_step: Callable[[StepOutput], None] | None = None) -> list[Request]:
        """Serve a workload: requests join at their arrival times (on this engine's clock, from now).
        progress: show a progress bar (a string: its label)."""
        pending = sorted(arrivals, key=lambda a: a.arrival_s)
        t0 = self.clock.now()
        requests: list[Request] = []
        bar = _progress() if progress else None
        with bar or contextlib.nullcontext():
            label = progress if isinstance(progress, str) else "requests"
            task = bar.add_task(label, total=len(pending)) if bar else None
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
                out = self.step(until=t0 + pending[i].arrival_s if i < len(pending) else None)
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


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    transient=True)
