"""The scheduler: requests in, one IterationPlan per iteration out.

The machinery here is shared by every policy -- admission, KV reservation with preemption
(recompute), finishing, aborting, hand-off, turning slices into a plan. A policy only decides which
slices run (moejax.engine.policies), through this contract:

    s.decodes(budget, skip)     one token for each running request in decode (KV reserved)
    s.reserve(req, n)           KV for n more tokens of a running request (may preempt others)
    s.admit(budget, whole)      waiting requests into running, KV allocated: [(request, tokens)]
    make_slice(req, n, a, b)    a RowSlice (pure: nothing is recorded)

A request is in the iteration being planned once KV was reserved or allocated for it; only requests
not in it can be preempted. Policies never touch the KV allocator.

Priority is first-come-first-served: when KV blocks run out, the running request that arrived last
and is not yet in this iteration is preempted: its blocks are freed and it goes back to the waiting
queue to be recomputed later, keeping the tokens it has produced.

A request whose prompt KV exists already (prefilled by another engine, `add_prefilled`) is admitted
as soon as blocks hold it, straight into decode; the plan carries its KV for the executor to import.

Models with Gated DeltaNet layers (Qwen3-Next) keep per request a fixed-size state slot beside the
blocks: a request is admitted only when a slot is free too, keeps it while running (a prompt's
chunks carry their state in it), and gives it back when it finishes, is aborted or preempted
(recompute rebuilds the state from the prompt). The plan names each request's slot.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Protocol

from moejax.config import ModelConfig
from moejax.engine.kv_cache import KVCacheManager
from moejax.engine.kv_transfer import KVPayload
from moejax.engine.plan import IterationPlan, RowSlice, SamplingRow, StepResult, layer_groups
from moejax.engine.request import Request, Status
from moejax.engine.sampling import RequestError

# Builds a NamedTuple from a tuple of its fields: a C call, where calling the class runs a Python-level
# __new__ (3x the time; the scheduler makes hundreds of RowSlices and SamplingRows per iteration)
new_tuple = tuple.__new__


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256  # running requests at most
    token_budget: int = 512  # tokens per iteration (chunked prefill: the chunk size)
    max_model_len: int = 2048  # prompt + output tokens of one request


class Policy(Protocol):
    name: str

    def schedule(self, s: "Scheduler") -> list[RowSlice]:
        """The slices of the next iteration (through the scheduler's contract, see module doc)."""
        ...

    def forget(self, request_id: int) -> None:
        """Drop policy state of a request that was preempted, finished or aborted."""
        ...

    def max_kept_rows(self, max_model_len: int) -> int:
        """Hidden rows the policy may leave between iterations at once (slices stopping mid-model)."""
        ...


def priority(req: Request) -> tuple[float, int]:
    return (req.arrival_time, req.request_id)


def make_slice(req: Request, num_tokens: int, layer_start: int, layer_end: int, num_layers: int) -> RowSlice:
    """The next `num_tokens` uncomputed tokens of req through layers [layer_start, layer_end)."""
    start = req.num_computed_tokens
    end = start + num_tokens
    return RowSlice(req.request_id, start, tuple(req.token_ids[start:end]), layer_start, layer_end,
                    layer_end == num_layers and end == len(req.token_ids), end)


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
        self.handed_off: list[Request] = []  # finished by hand-off, KV kept until exported (take_handoffs)
        self.step = 0
        self._released: list[int] = []
        self._scheduled: set[int] = set()
        self._prefilled: dict[int, KVPayload] = {}  # waiting requests whose prompt KV is given
        self._imports: list[tuple[int, tuple[int, ...], KVPayload]] = []
        self._ends: dict[int, tuple[tuple[int, ...], frozenset[int], int]] = {}  # request id -> (stop ids,
        # the same as a set, most tokens it may hold)
        if model_config.has_state_slots and kv.state_slots is None:
            raise ValueError(f"{model_config.name} keeps per-request state slots (Gated DeltaNet layers); "
                             "the KV cache manager has none (KVCacheManager(..., num_state_slots=...))")
        blocks_per_seq = -(-config.max_model_len // kv.block_size)
        if blocks_per_seq > kv.blocks_per_shard:  # a window group too: a prompt is written before it attends
            raise ValueError(f"the KV cache holds {kv.blocks_per_shard} blocks of {kv.block_size} tokens per request "
                             f"shard, fewer than one request of max_model_len={config.max_model_len} needs "
                             f"({blocks_per_seq})")

    @property
    def num_layers(self) -> int:
        return self.model_config.num_layers

    # --- requests in and out ----------------------------------------------------------------------
    def add(self, req: Request, kv: KVPayload | None = None) -> None:
        """Queue a request. With `kv` (its prompt's KV, from another engine) the request has computed
        every token but its last, and goes straight to decode once admitted."""
        if req.num_prompt_tokens >= self.config.max_model_len:
            raise RequestError(f"request {req.request_id}: prompt of {req.num_prompt_tokens} tokens does not fit "
                               f"max_model_len={self.config.max_model_len} (it must leave room for one output token)")
        if req.request_id in self.requests:
            raise RequestError(f"request id {req.request_id} is already in use")
        if kv is not None:
            self._prefilled[req.request_id] = kv
        p = req.params  # what ends the request, fixed at arrival: update() looks it up once per row
        stop_ids = p.stop_token_ids + (() if p.ignore_eos else self.model_config.eos_token_ids)
        self._ends[req.request_id] = (stop_ids, frozenset(stop_ids), min(req.num_prompt_tokens + p.max_tokens,
                                                                          self.config.max_model_len))
        self.requests[req.request_id] = req
        bisect.insort(self.waiting, req, key=priority)

    def abort(self, request_id: int, now: float) -> Request | None:
        req = self.requests.get(request_id)
        if req is not None:
            self._finish(req, "abort", now)
        return req

    def release_handoff(self, req: Request) -> None:
        """A handed-off request's KV was exported: free its blocks."""
        self.handed_off.remove(req)
        self.kv.free(req)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # --- the policies' contract --------------------------------------------------------------------
    def is_scheduled(self, req: Request) -> bool:
        """Whether req already has KV reserved in the iteration being planned."""
        return req.request_id in self._scheduled

    def admit(self, budget: int, whole_prompts: bool = False) -> list[tuple[Request, int]]:
        """Waiting requests into running, in priority order, their KV allocated -> [(request, tokens
        to compute now)]. Chunked: up to `budget` tokens in all, the last prompt cut to fit. Whole
        prompts: prompts that fit `budget` together (the first even if longer). New requests never
        preempt running ones: admission stops at the first that does not fit the free KV."""
        admitted = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            n = req.num_uncomputed if whole_prompts else min(req.num_uncomputed, budget)
            if (admitted and n > budget) or not self.kv.can_allocate(req, n):
                break
            self._run(req)
            self.kv.allocate(req, n)
            self._scheduled.add(req.request_id)
            admitted.append((req, n))
            budget -= n
        return admitted

    def reserve(self, req: Request, num_new_tokens: int) -> bool:
        """KV blocks for num_new_tokens more tokens of running `req`, preempting lower-priority requests
        not in this iteration if needed. False (and req itself preempted) when nothing can give way."""
        self._scheduled.add(req.request_id)
        if self.kv.blocks_needed(req, num_new_tokens) == 0:  # the common decode step: room in the last block
            return True
        shard = self.kv.shard_of(req)
        while not self.kv.can_allocate(req, num_new_tokens):
            # only requests holding blocks of req's shard can make room for it
            victims = [r for r in self.running if r is not req and r.request_id not in self._scheduled
                       and self.kv.shard_of(r) == shard]
            victim = max(victims, key=priority, default=None)
            if victim is None or priority(victim) < priority(req):
                self._scheduled.discard(req.request_id)
                self._preempt(req)
                return False
            self._preempt(victim)
        self.kv.allocate(req, num_new_tokens)
        return True

    def decodes(self, budget: int, skip: set[int] = frozenset()) -> tuple[list[RowSlice], int]:
        """One token for every running request with exactly one uncomputed token (not in `skip`),
        in priority order, within `budget` tokens -> (slices, budget left)."""
        slices, scheduled, L, block_size = [], self._scheduled, self.num_layers, self.kv.block_size
        running = Status.RUNNING
        for req in list(self.running):  # hundreds per iteration: the common case is inlined
            if budget == 0:
                break
            rid, tokens, start = req.request_id, req.token_ids, req.num_computed_tokens
            if len(tokens) - start != 1 or req.status is not running or rid in scheduled or rid in skip:
                continue
            if start < len(req.block_ids) * block_size:  # room in its last block: nothing to reserve
                scheduled.add(rid)
            elif not self.reserve(req, 1):
                continue
            slices.append(new_tuple(RowSlice, (rid, start, (tokens[start],), 0, L, True, start + 1)))
            budget -= 1
        return slices, budget

    def make_slice(self, req: Request, num_tokens: int, layer_start: int = 0, layer_end: int | None = None) -> RowSlice:
        """make_slice for this model (pure: records nothing)."""
        L = self.num_layers
        return make_slice(req, num_tokens, layer_start, L if layer_end is None else layer_end, L)

    # --- one iteration ------------------------------------------------------------------------------
    def schedule(self, max_decode_steps: int = 1) -> IterationPlan:
        """The next iteration. max_decode_steps > 1: when it holds only decodes, let it run up to that
        many steps at once (fewer when KV runs short, or so that a waiting request is admitted as soon
        as a running one may have finished)."""
        self._scheduled = set()
        self._admit_prefilled()
        slices = self.policy.schedule(self)
        requests = [self.requests[s.request_id] for s in slices]
        steps, limits = 1, ()
        # one step at a time while a request wants logprobs (the multi-step program returns tokens only)
        if max_decode_steps > 1 and slices and all(s.is_decode for s in slices) \
                and not any(r.params.logprobs is not None for r in requests):
            steps, limits = self._decode_steps(requests, max_decode_steps)
        return self._plan(slices, requests, steps, limits)

    def schedule_ahead(self, plan: IterationPlan, max_decode_steps: int) -> IterationPlan | None:
        """The iteration after `plan`, a multi-step decode still running, planned before its tokens are
        known (run-ahead): every running request decodes on, each assumed to produce all the steps
        `plan` gives it and none to stop on a token; those `plan` brings to their last token are left
        out. Its slices carry no input token: the executor takes each from `plan`'s output on the
        device. update() later skips a request that did stop in `plan`, so what it produced here is
        dropped and its blocks, freed by then, are reused only by iterations that run after this one.
        None when the next iteration may be anything else: requests waiting, a running request not in
        `plan`, a single step left, or KV short for the steps."""
        in_plan = {s.request_id for s in plan.slices}
        if plan.decode_steps <= 1 or self.waiting or any(r.request_id not in in_plan for r in self.running):
            return None
        done = plan.decode_steps  # tokens each continuing request produces in `plan`
        going = [(req, stop_ids, left - done) for s, (stop_ids, left) in zip(plan.slices, plan.decode_limits)
                 if left > done and (req := self.requests.get(s.request_id)) is not None
                 and req.status is Status.RUNNING and not req.handoff]
        if not going:
            return None
        requests = [r for r, _, _ in going]
        steps = min(max_decode_steps, max(left for _, _, left in going))
        while steps > 1 and not self.kv.can_allocate_all(requests, done + steps):
            steps //= 2
        if steps <= 1:
            return None
        for r, _, left in going:  # blocks for both iterations' tokens: update() has not advanced r yet
            self.kv.allocate(r, done + min(steps, left))
        L = self.num_layers
        slices = [new_tuple(RowSlice, (r.request_id, r.num_computed_tokens + done, (-1,), 0, L, True,
                                       r.num_computed_tokens + done + 1)) for r in requests]
        return self._plan(slices, requests, steps, tuple((stop_ids, left) for _, stop_ids, left in going),
                          produced=done, step=self.step + 1)

    def _plan(self, slices: list[RowSlice], requests: list[Request], steps: int, limits: tuple,
              produced: int = 0, step: int | None = None) -> IterationPlan:
        """The plan of these slices (of `requests`); produced: tokens each request has yet to receive
        from a running iteration before these (run-ahead), counted in the sampler's output index."""
        sampling = []
        for s, r in zip(slices, requests):
            if s.sample:
                p = r.params
                sampling.append(new_tuple(SamplingRow, (r.request_id, p.temperature, p.top_p, p.top_k, r.seed,
                                                        len(r.token_ids) - len(r.prompt_token_ids) + produced,
                                                        p.logprobs is not None)))
        hybrid = len(self.kv.groups) > 1
        plan = IterationPlan(
            step=self.step if step is None else step, slices=tuple(slices), groups=layer_groups(slices, self.num_layers),
            block_tables={r.request_id: r.block_ids for r in requests},
            sampling=tuple(sampling), released=tuple(self._released), num_layers=self.num_layers,
            kv_shards={r.request_id: self.kv.shard_of(r) for r in requests} if len(self.kv.shards) > 1 else {},
            kv_imports=tuple(self._imports), decode_steps=steps, decode_limits=limits,
            group_block_tables={r.request_id: r.group_block_ids for r in requests + [
                self.requests[rid] for rid, _, _ in self._imports]} if hybrid else {},
            state_slots={} if self.kv.state_slots is None else {
                r.request_id: r.state_slot for r in requests + [self.requests[rid] for rid, *_ in self._imports]})
        self._released, self._imports = [], []
        return plan

    def _decode_steps(self, requests: list[Request], most: int) -> tuple[int, tuple]:
        """How many steps a decode-only iteration runs, its KV reserved for them -> (steps, per request
        (stop ids, tokens it may still produce))."""
        ends = [self._ends[r.request_id] for r in requests]
        remaining = [token_limit - len(r.token_ids) for r, (_, _, token_limit) in zip(requests, ends)]
        steps = min(most, max(remaining))
        if self.waiting:  # admit the next request as soon as the first running one can finish
            steps = min(steps, min(remaining))
        while steps > 1 and not self.kv.can_allocate_all(requests, steps):
            steps //= 2
        if steps <= 1:
            return 1, ()
        for r, left in zip(requests, remaining):  # no slot past what a request may still produce
            self.kv.allocate(r, min(steps, left))
        return steps, tuple((stop_ids, left) for (stop_ids, _, _), left in zip(ends, remaining))

    def update(self, plan: IterationPlan, result: StepResult, now: float) -> list[Request]:
        """Apply an executed plan: advance computed tokens, append sampled tokens, finish requests."""
        finished, L, requests, ends, running = [], self.num_layers, self.requests, self._ends, Status.RUNNING
        sampled, steps = result.sampled, result.sampled_steps if plan.decode_steps > 1 else None
        for s in plan.slices:  # hundreds per iteration: the request's checks are inlined
            rid = s.request_id
            req = requests.get(rid)
            if req is None or req.status is not running:
                continue  # aborted while the iteration ran
            if s.layer_end == L:
                req.num_computed_tokens = s.context_len
            if not s.sample:
                continue
            _, stop_ids, token_limit = ends[rid]
            tokens = req.token_ids
            for token in ((sampled[rid],) if steps is None else steps[rid]):
                if len(tokens) > s.context_len:  # multi-step: this token's input is computed now
                    req.num_computed_tokens += 1
                tokens.append(token)
                req.token_times.append(now)
                if req.first_token_time is None:
                    req.first_token_time = now
                reason = ("stop" if token in stop_ids else "length" if len(tokens) >= token_limit
                          else "handoff" if req.handoff else None)
                if reason:
                    self._finish(req, reason, now)
                    finished.append(req)
                    break
        self.step += 1
        return finished

    # --- internals ------------------------------------------------------------------------------------
    def _run(self, req: Request) -> None:
        self.waiting.remove(req)
        req.status = Status.RUNNING
        bisect.insort(self.running, req, key=priority)

    def _admit_prefilled(self) -> None:
        """Prefilled requests whose KV fits go to running (their KV imported with this iteration's
        plan); in priority order among themselves, stopping at the first that does not fit."""
        for rid in sorted(self._prefilled, key=lambda r: priority(self.requests[r])):
            req = self.requests[rid]
            if len(self.running) >= self.config.max_num_seqs or not self.kv.can_allocate(req, 0):
                break
            self._run(req)
            self.kv.allocate(req, 0)  # blocks for its computed tokens; decoding reserves the next
            self._imports.append((rid, req.block_ids, self._prefilled.pop(rid)))

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        req.status = Status.WAITING
        bisect.insort(self.waiting, req, key=priority)
        self._released.append(req.request_id)
        self.policy.forget(req.request_id)

    def _finish(self, req: Request, reason: str, now: float) -> None:
        if req.status is Status.RUNNING:
            self.running.remove(req)
            if reason == "handoff":
                self.handed_off.append(req)  # its KV stays until the engine exported it
            else:
                self.kv.free(req)
        else:
            self.waiting.remove(req)
            self._prefilled.pop(req.request_id, None)
        req.status = Status.FINISHED
        req.finish_reason = reason
        req.finish_time = now
        del self.requests[req.request_id]
        del self._ends[req.request_id]
        self._released.append(req.request_id)
        self.policy.forget(req.request_id)
