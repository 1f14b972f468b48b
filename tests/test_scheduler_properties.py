"""Property tests of the scheduler and KV allocator with a fast fake executor: under random request
streams, aborts, budgets, cache sizes and multi-step decode, no block is leaked or owned twice, the
token budget holds, and every request finishes (or is aborted) with exactly the tokens a
non-preempted one-step run would give. The same with a window-aware cache (a full-attention pool and
a sliding-window pool): every key a slice's rows can see is in a live block, and the window pool
alone can force preemption. With per-request state slots (Gated DeltaNet layers), fewer than the
requests that may run: every running request holds its own slot, waiting ones none, none leaked.
A plain cache (one full-attention pool, no state slots) answers as the per-group rule does."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moejax.config import get_preset
from moejax.engine.engine import Engine
from moejax.engine.kv_cache import FREED, KVCacheManager
from moejax.engine.plan import StepResult
from moejax.engine.policies import make_policy
from moejax.engine.request import Request
from moejax.engine.sampling import SamplingParams
from moejax.engine.scheduler import Scheduler, SchedulerConfig

CFG = get_preset("tiny-qwen3-moe")


def next_token(context: tuple[int, ...]) -> int:
    """A deterministic 'model': the next token depends on the whole context."""
    return (sum((i + 1) * t for i, t in enumerate(context)) * 2654435761) % 500 + 1


class FakeExecutor:
    """Checks each plan against the KV state and answers like a model would."""

    def __init__(self, scheduler: Scheduler, max_decode_steps: int = 1):
        self.config = CFG
        self.s = scheduler
        self.max_decode_steps = max_decode_steps
        self.max_tokens_seen = 0

    def launch(self, plan, after=None):
        return plan  # computed in finish: by then the tokens feeding a plan run ahead (after's) are known

    def finish(self, plan):
        return self.execute(plan)

    def execute(self, plan):
        kv, bs = self.s.kv, self.s.kv.block_size
        tables = {rid: (t, *plan.group_block_tables.get(rid, ())) for rid, t in plan.block_tables.items()}
        for g in range(len(kv.groups)):
            owners: dict[int, int] = {}
            for rid, group_tables in tables.items():
                for b in group_tables[g]:
                    assert b not in owners or b == FREED, f"group {g}: block {b} owned by {owners[b]} and {rid}"
                    owners[b] = rid
        self.max_tokens_seen = max(self.max_tokens_seen, plan.num_tokens)
        sampled = {}
        # multi-step: KV reserved for every step a request may still take (decode_limits: in slice order)
        steps = ([min(plan.decode_steps, left) for _, left in plan.decode_limits] if plan.decode_steps > 1
                 else [1] * len(plan.slices))
        for sl, reserved in zip(plan.slices, steps):
            req = self.s.requests.get(sl.request_id)
            if req is None:  # a plan run ahead: its request stopped in the iteration before it
                continue
            end = sl.start + max(sl.num_tokens, reserved)
            assert len(plan.block_tables[sl.request_id]) * bs >= end
            for group, table in zip(kv.groups, tables[sl.request_id]):  # every key the rows see is live
                assert FREED not in table[group.first_live_block(sl.start, bs):-(-end // bs)]
            assert sl.token_ids == (-1,) or tuple(req.token_ids[sl.start:sl.start + sl.num_tokens]) == sl.token_ids
            if plan.decode_steps > 1:  # a plan run ahead too: its input is the request's last token
                assert len(req.token_ids) == sl.start + 1
            if sl.sample:
                sampled[sl.request_id] = next_token(tuple(req.token_ids))
        if plan.decode_steps == 1:
            return StepResult(sampled, 0.001, 0.0)
        steps = {}  # as the device loop does: each token feeds the next, a row stops at a stop id or its limit
        for sl, (stop_ids, left) in zip(plan.slices, plan.decode_limits):
            if sl.request_id not in self.s.requests:
                continue
            ctx, out = list(self.s.requests[sl.request_id].token_ids), []
            while len(out) < plan.decode_steps:
                out.append(next_token(tuple(ctx)))
                ctx.append(out[-1])
                if out[-1] in stop_ids or len(out) >= left:
                    break
            steps[sl.request_id] = out
        return StepResult({rid: t[0] for rid, t in steps.items()}, 0.001, 0.0, sampled_steps=steps)


def expected_output(prompt, max_tokens):
    ctx = list(prompt)
    for _ in range(max_tokens):
        ctx.append(next_token(tuple(ctx)))
    return ctx[len(prompt):]


def run_stream(policy, budget, max_seqs, num_blocks, requests, abort_at, decode_steps=1, window=None,
               window_blocks=0, state_slots=0) -> int:
    """Serve `requests` (prompt length, max tokens, unused) checking every invariant after each
    step, decode-only iterations running up to `decode_steps` steps; returns how many preemptions
    the stream caused. window: add a sliding-window KV group of window_blocks blocks; state_slots:
    per-request state slots beside the blocks."""
    block_size, max_len = 4, 64  # one request needs at most 16 blocks
    kv = KVCacheManager(num_blocks, block_size, num_state_slots=state_slots) if window is None else \
        KVCacheManager((num_blocks, window_blocks), block_size, windows=(None, window), num_state_slots=state_slots)
    num_blocks = kv.num_blocks
    budget = max(budget, max_len) if policy == "no_chunk" else budget
    sched = Scheduler(CFG, kv, make_policy(policy),
                      SchedulerConfig(max_num_seqs=max_seqs, token_budget=budget, max_model_len=max_len))
    executor = FakeExecutor(sched, decode_steps)
    engine = Engine(sched, executor, virtual_time=True)
    rng = np.random.default_rng(len(requests))
    reqs = []
    for plen, max_tokens, _ in requests:
        prompt = rng.integers(1, 500, plen).tolist()
        reqs.append(engine.add_request(prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True)))
    aborts = {step: rid for step, rid in abort_at if rid < len(reqs)}
    for step in range(10_000):
        if not engine.has_unfinished:
            break
        if step in aborts:
            engine.abort(aborts[step])
        if engine.has_unfinished:
            engine.step()
        held = sum(sum(b != FREED for b in t) for r in sched.running for t in kv.tables(r))
        assert held + kv.num_free_blocks == num_blocks  # every block is free or held exactly once
        assert all(not r.block_ids and not r.group_block_ids for r in sched.waiting)
        if state_slots:
            slots = [r.state_slot for r in sched.running]
            assert None not in slots and len(set(slots)) == len(slots) == state_slots - kv.state_slots.num_free
            assert all(r.state_slot is None for r in sched.waiting)
    else:
        raise AssertionError("requests did not finish")
    assert executor.max_tokens_seen <= budget or policy in ("no_chunk", "layered")  # whole prompts
    assert kv.num_free_blocks == num_blocks and (not state_slots or kv.state_slots.num_free == state_slots)
    for r, (plen, max_tokens, _) in zip(reqs, requests):
        assert r.is_finished
        if r.finish_reason != "abort":
            want = expected_output(r.prompt_token_ids, max_tokens)
            limit = max_len - plen  # generation also stops at max_model_len
            assert r.output_token_ids == want[:limit]
    return sum(r.num_preemptions for r in reqs)


@settings(max_examples=60, deadline=None)
@given(policy=st.sampled_from(["chunked", "no_chunk"]),
       budget=st.integers(1, 64), max_seqs=st.integers(1, 6), num_blocks=st.integers(16, 60),
       requests=st.lists(st.tuples(st.integers(1, 40), st.integers(1, 20), st.integers(0, 30)), min_size=1, max_size=12),
       abort_at=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 11)), max_size=3),
       decode_steps=st.sampled_from([1, 3, 8]), state_slots=st.sampled_from([0, 0, 1, 2, 4]))
def test_scheduler_invariants(policy, budget, max_seqs, num_blocks, requests, abort_at, decode_steps, state_slots):
    run_stream(policy, budget, max_seqs, num_blocks, requests, abort_at, decode_steps, state_slots=state_slots)


@pytest.mark.parametrize("policy", ["chunked", "no_chunk"])
def test_invariants_hold_through_preemption(policy):
    """A stream crowded enough that the cache must fill: the same invariants hold across preemptions
    (the random streams above reach full caches only by chance)."""
    crowded = [(40, 20, 0)] * 6  # six requests of up to 15 blocks each into 24 blocks
    assert run_stream(policy, 64, 6, 24, crowded, []) > 0
    assert run_stream(policy, 64, 6, 24, crowded, [], decode_steps=4) > 0


@settings(max_examples=40, deadline=None)
@given(policy=st.sampled_from(["chunked", "no_chunk", "layered"]), budget=st.integers(1, 64),
       max_seqs=st.integers(1, 6), num_blocks=st.integers(16, 60), window=st.integers(1, 24),
       window_blocks=st.integers(16, 40),
       requests=st.lists(st.tuples(st.integers(1, 40), st.integers(1, 20), st.integers(0, 30)), min_size=1, max_size=10),
       abort_at=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 9)), max_size=3),
       decode_steps=st.sampled_from([1, 3, 8]))
def test_scheduler_invariants_with_a_window_group(policy, budget, max_seqs, num_blocks, window, window_blocks,
                                                  requests, abort_at, decode_steps):
    run_stream(policy, budget, max_seqs, num_blocks, requests, abort_at, decode_steps, window, window_blocks)


@pytest.mark.parametrize("policy", ["chunked", "no_chunk"])
def test_window_pool_alone_forces_preemption(policy):
    """Full-attention blocks for every request at once, but a window pool smaller than eight decode
    windows (3 blocks each once past the window): short prompts admitted together outgrow it as they
    decode, and preemption (with outputs unchanged) comes from the window group alone."""
    crowded = [(1, 20, 0)] * 8  # 6 blocks each: 48 full-attention blocks
    assert run_stream(policy, 64, 8, 96, crowded, []) == 0
    assert run_stream(policy, 64, 8, 96, crowded, [], window=8, window_blocks=16) > 0
    assert run_stream(policy, 64, 8, 96, crowded, [], 4, window=8, window_blocks=16) > 0


@settings(max_examples=60, deadline=None)
@given(num_shards=st.sampled_from([1, 2]), blocks_per_shard=st.integers(1, 24),
       ops=st.lists(st.tuples(st.sampled_from(["grow", "free", "ask"]), st.integers(0, 5), st.integers(0, 40)),
                    max_size=40))
def test_plain_kv_path_equals_the_general_one(num_shards, blocks_per_shard, ops):
    """A cache of one full-attention pool and no state slots takes a short path in can_allocate_all /
    allocate: the same operations on it and on the same cache made to take the per-group rule give
    the same answers, block tables and free blocks."""
    caches = [KVCacheManager(num_shards * blocks_per_shard, 4, num_shards) for _ in range(2)]
    assert caches[0].plain
    caches[1].plain = False
    reqs = [[Request(i, [1] * 8, SamplingParams(), seed=0) for i in range(6)] for _ in caches]
    for op, i, n in ops:
        if op == "ask":  # several requests at once, as multi-step decode asks
            answers = [kv.can_allocate_all(rs[:i + 1], n) for kv, rs in zip(caches, reqs)]
        else:
            answers = [kv.can_allocate(rs[i], n) for kv, rs in zip(caches, reqs)]
        assert answers[0] == answers[1]
        for kv, rs in zip(caches, reqs):
            if op == "free":
                kv.free(rs[i])
                rs[i].num_computed_tokens = 0
            elif op == "grow" and answers[0]:
                kv.allocate(rs[i], n)
                rs[i].num_computed_tokens += n
        for a, b in zip(*reqs):
            assert (a.block_ids, a.group_block_ids) == (b.block_ids, b.group_block_ids)
        assert [a.num_free for a in caches[0].shards] == [a.num_free for a in caches[1].shards]
