"""The scheduler: requests in, one IterationPlan per iteration out.

The machinery here is shared by every policy — admission, KV reservation with preemption
(recompute), finishing, aborting, turning slices into a plan. A policy only decides which slices run
(moejax.engine.policies).

Priority is first-come-first-served: when KV blocks run out, the running request that arrived last
and is not yet in this iteration is preempted: its blocks are freed and it goes back to the waiting
queue to be recomputed later, keeping the tokens it has produced.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Protocol

from moejax.config import ModelConfig
from moejax.engine.kv_cache import KVCacheManager
from moejax.engine.plan import IterationPlan, RowSlice, SamplingRow, StepResult, layer_groups
from moejax.engine.request import Request, Status
from moejax.engine.sampling import RequestError


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256  # running requests at most
    token_budget: int = 512  # tokens per iteration (chunked prefill: the chunk size)
    max_model_len: int = 2048  # prompt + output tokens of one request


class Policy(Protocol):
    name: str

    def schedule(self, s: "Scheduler") -> list[RowSlice]:
        """The slices of the next iteration (use s.reserve / s.admit / s.make_slice)."""
        ...

    def forget(self, request_id: int) -> None:
        """Drop policy state of a request that was preempted, finished or aborted."""
        ...


def priority(req: Request) -> tuple[float, int]:
    return (req.arrival_time, req.request_id)


class Scheduler:
    def __init__(self, model_config: ModelConfig, kv: KVCacheManager, policy: Policy,
                 config: SchedulerConfig = SchedulerConfig()):
        self.model_config = model_config
        self.kv = kv
        self.policy = policy
        self.config = config
        self.waiting: list[Request] = []  # sorted by priority
        self.running: list[Request] = []  # sorted by priority
        self.requests: dict[int, Request] = {}  # unfinished requests
        self.step = 0
        self._released: list[int] = []
        self._scheduled: set[int] = set()
        blocks_per_seq = -(-config.max_model_len // kv.block_size)
        if blocks_per_seq > kv.blocks_per_shard:
            raise ValueError(f"the KV cache holds {kv.blocks_per_shard} blocks of {kv.block_size} tokens per request "
                             f"shard, fewer than one request of max_model_len={config.max_model_len} needs "
                             f"({blocks_per_seq})")

    @property
    def num_layers(self) -> int:
        return self.model_config.num_layers

    # --- requests in and out ----------------------------------------------------------------------
    def add(self, req: Request) -> None:
        if req.num_prompt_tokens >= self.config.max_model_len:
            raise RequestError(f"request {req.request_id}: prompt of {req.num_prompt_tokens} tokens does not fit "
                               f"max_model_len={self.config.max_model_len} (it must leave room for one output token)")
        if req.request_id in self.requests:
            raise RequestError(f"request id {req.request_id} is already in use")
        self.requests[req.request_id] = req
        bisect.insort(self.waiting, req, key=priority)

    def abort(self, request_id: int, now: float) -> Request | None:
        req = self.requests.get(request_id)
        if req is not None:
            self._finish(req, "abort", now)
        return req

    @property
    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # --- helpers for policies ---------------------------------------------------------------------
    def is_scheduled(self, req: Request) -> bool:
        """Whether req already has a slice in the iteration being planned."""
        return req.request_id in self._scheduled

    def admit(self, req: Request) -> None:
        self.waiting.remove(req)
        req.status = Status.RUNNING
        bisect.insort(self.running, req, key=priority)

    def preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        req.status = Status.WAITING
        bisect.insort(self.waiting, req, key=priority)
        self._released.append(req.request_id)
        self.policy.forget(req.request_id)

    def reserve(self, req: Request, num_new_tokens: int) -> bool:
        """KV blocks for num_new_tokens more tokens of running `req`, preempting lower-priority requests
        not in this iteration if needed. False (and req itself preempted) when nothing can give way."""
        if self.kv.blocks_needed(req, num_new_tokens) == 0:  # the common decode step: room in the last block
            return True
        shard = self.kv.shard_of(req)
        while not self.kv.can_allocate(req, num_new_tokens):
            # only requests holding blocks of req's shard can make room for it
            victims = [r for r in self.running if r is not req and r.request_id not in self._scheduled
                       and self.kv.shard_of(r) == shard]
            victim = max(victims, key=priority, default=None)
            if victim is None or priority(victim) < priority(req):
                self.preempt(req)
                return False
            self.preempt(victim)
        self.kv.allocate(req, num_new_tokens)
        return True

    def schedule_decodes(self, budget: int, skip: set[int] = frozenset()) -> tuple[list[RowSlice], int]:
        """One token for every running request with exactly one uncomputed token (not in `skip`),
        in priority order, within `budget` tokens -> (slices, budget left)."""
        slices, scheduled = [], self._scheduled
        for req in list(self.running):
            if budget == 0:
                break
            rid = req.request_id
            if (len(req.token_ids) - req.num_computed_tokens == 1 and req.status is Status.RUNNING
                    and rid not in scheduled and rid not in skip and self.reserve(req, 1)):
                slices.append(self.make_slice(req, 1))
                budget -= 1
        return slices, budget

    def make_slice(self, req: Request, num_tokens: int, layer_start: int = 0, layer_end: int | None = None) -> RowSlice:
        """The next `num_tokens` uncomputed tokens of req through layers [layer_start, layer_end)."""
        L = self.model_config.num_layers
        layer_end = L if layer_end is None else layer_end
        start = req.num_computed_tokens
        end = start + num_tokens
        self._scheduled.add(req.request_id)
        return RowSlice(req.request_id, start, tuple(req.token_ids[start:end]), layer_start, layer_end,
                        layer_end == L and end == len(req.token_ids), end)

    # --- one iteration ------------------------------------------------------------------------------
    def schedule(self) -> IterationPlan:
        self._scheduled = set()
        slices = self.policy.schedule(self)
        requests = [self.requests[s.request_id] for s in slices]
        sampling = tuple(SamplingRow(r.request_id, r.params.temperature, r.params.top_p, r.params.top_k, r.seed,
                                     len(r.token_ids) - len(r.prompt_token_ids))
                         for s, r in zip(slices, requests) if s.sample)
        plan = IterationPlan(
            step=self.step, slices=tuple(slices), groups=layer_groups(slices, self.num_layers),
            block_tables={r.request_id: r.block_ids for r in requests},
            sampling=sampling, released=tuple(self._released), num_layers=self.num_layers)
        self._released = []
        return plan

    def update(self, plan: IterationPlan, result: StepResult, now: float) -> list[Request]:
        """Apply an executed plan: advance computed tokens, append sampled tokens, finish requests."""
        finished, L, sampled = [], self.num_layers, result.sampled
        for s in plan.slices:
            req = self.requests.get(s.request_id)
            if req is None or req.status is not Status.RUNNING:
                continue  # aborted while the iteration ran
            if s.layer_end == L:
                req.num_computed_tokens = s.context_len
            if s.sample:
                token = sampled[s.request_id]
                req.token_ids.append(token)
                req.token_times.append(now)
                if req.first_token_time is None:
                    req.first_token_time = now
                reason = self._stop_reason(req, token)
                if reason:
                    self._finish(req, reason, now)
                    finished.append(req)
        self.step += 1
        return finished

    def _stop_reason(self, req: Request, token: int) -> str | None:
        p = req.params
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.model_config.eos_token_ids):
            return "stop"
        if req.num_output_tokens >= p.max_tokens or req.num_tokens >= self.config.max_model_len:
            return "length"
        return None

    def _finish(self, req: Request, reason: str, now: float) -> None:
        if req.status is Status.RUNNING:
            self.running.remove(req)
            self.kv.free(req)
        else:
            self.waiting.remove(req)
        req.status = Status.FINISHED
        req.finish_reason = reason
        req.finish_time = now
        del self.requests[req.request_id]
        self._released.append(req.request_id)
        self.policy.forget(req.request_id)
