"""Qwen3-Next on the engine: every request holds one state slot (its Gated DeltaNet layers' state)
beside its KV blocks. Greedy outputs equal the one-request reference for every policy (prompt chunks
carrying their state, whole prompts, a cohort crossing layer groups), under preemption and with
fewer slots than requests, on the jax and the offload executor; slots are taken at admission and given
back at finish and preemption; KV + state bytes per request agree with the real cache, the simulator's
traffic and an export; the simulators (sim, sim-offload) budget state slots before blocks."""

import dataclasses

import numpy as np
import pytest

from moejax.config import get_preset
from moejax.engine import build
from moejax.engine.kv_cache import kv_block_bytes, kv_bytes, state_slot_bytes
from moejax.engine.kv_transfer import KVTransferError
from moejax.engine.plan import RowSlice, plan_of
from moejax.engine.sampling import SamplingParams
from moejax.engine.traffic import layer_stats
from moejax.models.model import build_model
from moejax.models.reference import greedy_generate

MAX_TOKENS = 8
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    return build_model(get_preset("tiny-qwen3-next"), seed=7)


@pytest.fixture(scope="module")
def prompts(model):
    rng = np.random.default_rng(0)
    return [rng.integers(0, model.config.vocab_size, n).tolist() for n in (3, 21, 30, 14, 9)]


@pytest.fixture(scope="module")
def expected(model, prompts):
    return [greedy_generate(model, p, MAX_TOKENS, block_size=64) for p in prompts]  # one cache shape for all


# One cache shape for every engine here (compiled programs are shared): 3 state slots for 5 requests,
# and 16 blocks of 4 tokens where the 3 longest running at once need 23, so requests wait for a slot
# and some are preempted (recomputed from their prompt, their state rebuilt).
ENGINE = dict(max_model_len=64, block_size=4, num_blocks=16, state_slots=3, max_num_seqs=8)


def run(model, prompts, **options):
    """Serve all prompts; after every step, each running request holds its own slot, waiting ones none."""
    engine = build(model, **ENGINE, **options)
    kv = engine.scheduler.kv
    reqs = [engine.add_request(p, GREEDY, request_id=i) for i, p in enumerate(prompts)]
    waited_for_a_slot, decode_steps = False, set()
    while engine.has_unfinished:
        out = engine.step()
        running, waiting = engine.scheduler.running, engine.scheduler.waiting
        slots = [r.state_slot for r in running]
        assert None not in slots and len(set(slots)) == len(slots) == kv.state_slots.num_slots - kv.state_slots.num_free
        assert all(r.state_slot is None for r in waiting)
        assert all(out.plan.state_slots[s.request_id] is not None for s in out.plan.slices)
        waited_for_a_slot |= bool(waiting) and kv.state_slots.num_free == 0 and kv.num_free_blocks > 0
        decode_steps.add(out.plan.decode_steps)
    assert kv.num_free_blocks == kv.num_blocks and kv.state_slots.num_free == kv.state_slots.num_slots
    assert waited_for_a_slot and sum(r.num_preemptions for r in engine.finished) > 0
    return [r.output_token_ids for r in reqs], decode_steps


@pytest.mark.parametrize("options", [
    # prompts cut into chunks that carry the state, mixed with decodes (slow: ~4 min on a loaded 2-core box)
    pytest.param(dict(policy="chunked", token_budget=16), marks=pytest.mark.slow, id="chunked-16"),
    pytest.param(dict(policy="no_chunk", token_budget=32), marks=pytest.mark.slow, id="no_chunk"),
    # a cohort of whole prompts crossing layer groups over iterations
    pytest.param(dict(policy="layered"), id="layered"),
])
def test_greedy_matches_reference_with_slot_waits_and_preemption(model, prompts, expected, options):
    outputs, decode_steps = run(model, prompts, **options)
    assert outputs == expected
    assert max(decode_steps) > 1  # multi-step decode carried the state through its steps too


@pytest.mark.slow  # every layer in steps with host syncs: ~5 min on a loaded 2-core box
def test_offload_executor_matches_reference(model, prompts, expected):
    """The offload executor (experts in host memory, a device cache of 4 of the 16 per layer) runs the
    Gated DeltaNet layers in its layer steps over the same state slots."""
    outputs, decode_steps = run(model, prompts, executor="offload", device_expert_slots=4, predictor="lfru")
    assert outputs == expected and decode_steps == {1}  # one decode step per plan (it routes on the host)


def test_bytes_per_token_and_request_agree_with_the_cache_and_the_simulator(model):
    cfg = model.config
    engine = build(model, **ENGINE)
    cache = engine.executor.kv
    paged = [i for i in range(cfg.num_layers) if not cfg.linear_layers[i]]
    linear = [i for i in range(cfg.num_layers) if cfg.linear_layers[i]]
    tokens, slots = ENGINE["num_blocks"] * ENGINE["block_size"], ENGINE["state_slots"]
    token_bytes = {i: sum(a.nbytes for a in cache[i]) // tokens for i in paged}
    slot_bytes = {i: sum(a.nbytes for a in cache[i]) // slots for i in linear}
    assert kv_block_bytes(cfg, 1) == sum(token_bytes.values())
    assert state_slot_bytes(cfg) == sum(slot_bytes.values()) > 0
    for n in (1, 10, 50):
        assert kv_bytes(cfg, n) == n * sum(token_bytes.values()) + sum(slot_bytes.values())

    # what the simulator prices: a linear layer reads (past position 0) and writes its state, an
    # attention layer reads the context's KV and writes the new tokens'
    decode, prompt = RowSlice(0, 20, (5,), 0, 4, True, 21), RowSlice(1, 0, tuple(range(9)), 0, 4, True, 9)
    stats = layer_stats(cfg, plan_of(0, [decode, prompt], cfg.num_layers))
    for i in linear:
        assert stats.kv_read_bytes[i] == slot_bytes[i] and stats.kv_write_bytes[i] == 2 * slot_bytes[i]
    for i in paged:
        assert stats.kv_read_bytes[i] == (21 + 9) * token_bytes[i]
        assert stats.kv_write_bytes[i] == (1 + 9) * token_bytes[i]

    # a hand-off exports exactly that: KV of the prompt's tokens, one state slot
    req = engine.add_request(list(range(11)), SamplingParams(max_tokens=2), handoff=True)
    while engine.has_unfinished:
        engine.step()
    (handoff,) = engine.handoffs
    assert req.finish_reason == "handoff" and handoff.kv.nbytes == kv_bytes(cfg, 11)
    assert [s.kind for s in handoff.kv.states] == ["recurrent" if x else "paged" for x in cfg.linear_layers]
    assert engine.scheduler.kv.state_slots.num_free == slots

    # a recurrent state of the wrong size is refused, named
    states = list(handoff.kv.states)
    states[1] = dataclasses.replace(states[1], arrays={**states[1].arrays,
                                                       "recurrent": states[1].arrays["recurrent"][:, :-1]})
    bad = dataclasses.replace(handoff, kv=dataclasses.replace(handoff.kv, states=tuple(states)))
    with pytest.raises(KVTransferError, match=r"layer 1 recurrent: shape \[4, 31, 32\] float32; expected \[4, 32, 32\]"):
        engine.add_prefilled(bad)


def test_simulated_qwen3_next_prices_state_not_per_token_kv():
    """On the cost model the 80B shape's linear layers move their state, whatever the context: a
    decode at 4K context moves the same state bytes as one at 1K, while its attention layers' KV
    reads grow with the context."""
    cfg = get_preset("qwen3-next-80b-a3b")
    short, long = (layer_stats(cfg, plan_of(0, [RowSlice(0, n, (1,), 0, cfg.num_layers, True, n + 1)], cfg.num_layers))
                   for n in (1024, 4096))
    linear = np.array(cfg.linear_layers)
    assert np.array_equal(short.kv_read_bytes[linear], long.kv_read_bytes[linear])
    assert np.all(long.kv_read_bytes[~linear] > 3.9 * short.kv_read_bytes[~linear])
    engine = build("qwen3-next-80b-a3b", "sim", hardware="h200x2", max_num_seqs=64)
    assert engine.scheduler.kv.state_slots.num_slots == 64
    offload = build("qwen3-next-80b-a3b", "sim-offload", hardware="h200x2", max_num_seqs=64, offload_experts=0.5)
    assert offload.scheduler.kv.state_slots.num_slots == 64
    # the same budget holds fewer blocks beside 64 state slots than beside 8
    fewer_slots = build("qwen3-next-80b-a3b", "sim", hardware="h200x2", max_num_seqs=64, state_slots=8)
    assert fewer_slots.scheduler.kv.num_blocks > engine.scheduler.kv.num_blocks
    request = offload.add_request(list(range(100)), SamplingParams(max_tokens=4, ignore_eos=True))
    while offload.has_unfinished:
        offload.step()
    assert request.finish_reason == "length" and offload.scheduler.kv.state_slots.num_free == 64
