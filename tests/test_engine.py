"""The engine end to end on the tiny model: greedy outputs equal the reference generation for every
policy, chunk size, batch composition, arrival order and with forced preemption; no recompilation in
steady state; abort frees blocks; streaming; seeded sampling."""

import asyncio

import numpy as np
import pytest

from moejax.config import get_preset
from moejax.engine.compiles import count_compilations
from moejax.engine import build
from moejax.engine.engine import Arrival
from moejax.engine.sampling import RequestError, SamplingParams
from moejax.models.model import build_model
from moejax.models.reference import greedy_generate

MAX_TOKENS = 12
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    return build_model(get_preset("tiny-qwen3-moe"), seed=7)


@pytest.fixture(scope="module")
def prompts(model):
    rng = np.random.default_rng(0)
    return [rng.integers(0, model.config.vocab_size, n).tolist() for n in (1, 5, 17, 30, 9, 44, 3, 23)]


@pytest.fixture(scope="module")
def expected(model, prompts):
    return [greedy_generate(model, p, MAX_TOKENS) for p in prompts]


def run(model, prompts, order=None, **options):
    engine = build(model, max_model_len=128, block_size=4, **options)
    order = order or list(range(len(prompts)))
    reqs = {i: engine.add_request(prompts[i], GREEDY, request_id=i) for i in order}
    while engine.has_unfinished:
        engine.step()
    assert engine.scheduler.kv.num_free_blocks == engine.scheduler.kv.num_blocks  # nothing leaked
    return [reqs[i].output_token_ids for i in range(len(prompts))], engine


@pytest.mark.parametrize("options", [
    dict(policy="chunked", token_budget=512),
    dict(policy="chunked", token_budget=16),   # long prompts split into chunks, mixed with decodes
    dict(policy="chunked", token_budget=5),    # tiny chunks; decodes crowd out prefill
    dict(policy="no_chunk", token_budget=64),
    dict(policy="chunked", token_budget=64, max_num_seqs=2),  # batch composition changes as requests finish
], ids=["chunked-512", "chunked-16", "chunked-5", "no_chunk", "max2seqs"])
def test_greedy_matches_reference(model, prompts, expected, options):
    outputs, _ = run(model, prompts, **options)
    assert outputs == expected


def test_arrival_order_does_not_matter(model, prompts, expected):
    outputs, _ = run(model, prompts, order=[5, 2, 7, 0, 3, 1, 6, 4], policy="chunked", token_budget=16)
    assert outputs == expected


@pytest.mark.parametrize("policy", ["chunked", "no_chunk"])
def test_forced_preemption_keeps_outputs(model, prompts, expected, policy):
    # 40 blocks of 4 tokens: a request needs up to 15, so requests must be preempted and recomputed
    outputs, engine = run(model, prompts, policy=policy, token_budget=64, num_blocks=40)
    assert sum(r.num_preemptions for r in engine.finished) > 0
    assert outputs == expected


def test_staggered_arrivals_through_run(model, prompts, expected):
    engine = build(model, max_model_len=128, block_size=4, token_budget=16)
    arrivals = [Arrival(0.001 * i, p, GREEDY) for i, p in enumerate(prompts)]
    reqs = engine.run(arrivals)
    assert [r.output_token_ids for r in reqs] == expected
    m = engine.metrics(reqs)
    assert m["num_requests"] == len(prompts) and m["ttft_p50_s"] > 0 and m["expert_bytes_total"] > 0


def test_no_recompilation_in_steady_state(model):
    """After warm-up runs, further request mixes (other lengths, other order, other tokens) whose
    iterations fall in the row buckets already met compile nothing. (One warm-up mix is not enough:
    each pair of row-count and sampled-row buckets is a program, and a mix meets only some pairs.)"""
    rng = np.random.default_rng(3)
    engine = build(model, max_model_len=128, block_size=4, token_budget=32)

    def serve(lengths):
        for n in lengths:
            engine.add_request(rng.integers(0, 512, n).tolist(), GREEDY)
        while engine.has_unfinished:
            engine.step()

    serve([30, 7, 19, 2, 25, 11])
    serve([29, 6, 20, 3, 26, 12])
    with count_compilations() as n:
        serve([31, 8, 18, 1, 24, 10])
        serve([12, 26, 3, 20, 6, 29])
    assert n.count == 0


def test_abort_frees_blocks_mid_flight(model, prompts):
    engine = build(model, max_model_len=128, block_size=4, token_budget=16)
    a = engine.add_request(prompts[5], SamplingParams(max_tokens=50, ignore_eos=True))
    b = engine.add_request(prompts[3], GREEDY)
    engine.step()
    engine.step()
    assert a.block_ids
    engine.abort(a.request_id)
    assert a.is_finished and a.finish_reason == "abort" and not a.block_ids
    while engine.has_unfinished:
        engine.step()
    assert b.finish_reason == "length"
    assert engine.scheduler.kv.num_free_blocks == engine.scheduler.kv.num_blocks


def test_sampling_is_reproducible_and_batch_independent(model, prompts):
    params = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    alone, _ = run(model, prompts[3:4], policy="chunked")
    engine = build(model, max_model_len=128, block_size=4)
    r1 = engine.add_request(prompts[3], params)
    others = [engine.add_request(p, SamplingParams(max_tokens=7, temperature=1.0, ignore_eos=True)) for p in prompts[:3]]
    while engine.has_unfinished:
        engine.step()
    engine2 = build(model, max_model_len=128, block_size=4, token_budget=8)
    r2 = engine2.add_request(prompts[3], params)
    while engine2.has_unfinished:
        engine2.step()
    assert r1.output_token_ids == r2.output_token_ids  # same seed, different batch and chunking
    assert r1.output_token_ids != alone[0][:10]  # and it did sample (not greedy)
    assert len({tuple(o.output_token_ids) for o in others}) > 1


def test_top_k_one_is_greedy(model, prompts, expected):
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=1.5, top_k=1, seed=5, ignore_eos=True)
    engine = build(model, max_model_len=128, block_size=4)
    r = engine.add_request(prompts[2], params)
    while engine.has_unfinished:
        engine.step()
    assert r.output_token_ids == expected[2]


def test_request_validation(model):
    engine = build(model, max_model_len=32, block_size=4)
    with pytest.raises(RequestError, match="prompt is empty"):
        engine.add_request([])
    with pytest.raises(RequestError, match=r"outside the vocabulary \[0, 512\)"):
        engine.add_request([1, 512])
    with pytest.raises(RequestError, match="does not fit max_model_len=32"):
        engine.add_request(list(range(32)))
    with pytest.raises(RequestError, match=r"SamplingParams.max_tokens=-1: must be an integer >= 1"):
        SamplingParams(max_tokens=-1)
    with pytest.raises(RequestError, match=r"top_p=0: must be in \(0, 1\]"):
        SamplingParams(top_p=0)


def test_stop_tokens(model, prompts, expected):
    stop = expected[4][5]
    engine = build(model, max_model_len=128, block_size=4)
    r = engine.add_request(prompts[4], SamplingParams(max_tokens=MAX_TOKENS, stop_token_ids=(stop,)))
    while engine.has_unfinished:
        engine.step()
    first = expected[4].index(stop)
    assert r.output_token_ids == expected[4][:first + 1] and r.finish_reason == "stop"


def test_streaming(model, prompts, expected):
    from moejax import LLM

    llm = LLM("tiny-qwen3-moe", seed=7, max_model_len=128, block_size=4)
    got: dict[int, list[int]] = {}
    finished = set()
    for delta in llm.stream(prompts[:3], GREEDY):
        got.setdefault(delta.request_id, []).extend(delta.token_ids)
        if delta.finished:
            finished.add(delta.request_id)
    assert list(got.values()) == expected[:3] and len(finished) == 3

    async def consume():
        out = []
        async for delta in llm.astream([prompts[4]], GREEDY):
            out.extend(delta.token_ids)
        return out
    assert asyncio.run(consume()) == expected[4]


def test_generate_reports_compile_time(prompts, expected):
    """last_stats tells compilation from serving: the first call compiles, the same call again does not."""
    from moejax import LLM

    llm = LLM("tiny-qwen3-moe", seed=7, max_model_len=128, block_size=4)
    first = [o.token_ids for o in llm.generate(prompts[:2], GREEDY)]
    cold = llm.last_stats
    assert first == expected[:2]
    llm.generate(prompts[:2], GREEDY)
    warm = llm.last_stats
    assert cold["compilations"] > 0 and 0 < cold["compile_seconds"] < cold["seconds"]
    assert warm["compilations"] == 0 and warm["compile_seconds"] == 0


def test_fused_iterations_equal_layer_by_layer(model, prompts):
    """Iterations whose slices all cross every layer run as one program; the layer-by-layer path is
    its twin: identical tokens and identical per-layer expert counts, iteration by iteration."""
    runs = []
    for fuse in (True, False):
        engine = build(model, max_model_len=128, block_size=4, token_budget=16)
        engine.executor.fuse = fuse
        reqs = [engine.add_request(p, SamplingParams(max_tokens=6, temperature=0.8, seed=9, ignore_eos=True))
                for p in prompts]
        counts = []
        while engine.has_unfinished:
            counts.append(engine.step().result.layer_stats.expert_tokens)
        runs.append(([r.output_token_ids for r in reqs], counts))
    (tokens_fused, counts_fused), (tokens_layers, counts_layers) = runs
    assert tokens_fused == tokens_layers
    assert len(counts_fused) == len(counts_layers)
    for a, b in zip(counts_fused, counts_layers):
        np.testing.assert_array_equal(a, b)


def test_llm_prefills_a_batch_in_one_iteration_by_default():
    """Offline, LLM's token budget (OFFLINE_TOKEN_BUDGET) takes a batch of prompts the engine's serving
    default (512) would chunk in one iteration, so every request decodes from the next one on; an
    explicit token_budget still chunks, with the same greedy tokens."""
    from moejax import LLM
    from moejax.llm import OFFLINE_TOKEN_BUDGET

    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, 512, 30).tolist() for _ in range(40)]  # 1200 tokens: > 512, <= the budget
    assert 512 < 1200 <= OFFLINE_TOKEN_BUDGET
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    outputs, first_steps = {}, {}
    for budget in (None, 512):
        llm = LLM("tiny-qwen3-moe", seed=5, max_model_len=64, **({} if budget is None else {"token_budget": budget}))
        outputs[budget] = [o.token_ids for o in llm.generate(prompts, params)]
        first_steps[budget] = llm.engine.steps[0]
    assert first_steps[None].num_prefill_tokens == first_steps[None].num_tokens == 1200
    assert first_steps[512].num_tokens <= 512
    assert outputs[None] == outputs[512]
