"""GPT-OSS on the engine with the window-aware KV cache (tiny-gpt-oss: window 16, blocks of 4).

Greedy outputs equal the one-request reference for every policy, one decode step per iteration and
several, with requests outgrowing the window (their window blocks freed mid-request) in a cache small
enough to preempt; in decode a request's window blocks stay within window / block_size + 1 while its
full-attention blocks grow, and the bytes it holds in the real device cache are kv_bytes(cfg, n); the
simulator prices KV the same way.

Every engine here has one cache size (one set of compiled programs)."""

import numpy as np
import pytest

from moejax.config import PRESETS, get_preset
from moejax.engine import build, traffic
from moejax.engine.kv_cache import FREED, group_block_bytes, kv_block_bytes, kv_bytes, kv_groups, window_blocks
from moejax.engine.plan import IterationPlan, RowSlice, layer_groups
from moejax.engine.sampling import SamplingParams
from moejax.models.model import build_model
from moejax.models.reference import greedy_generate

BS, MAX_TOKENS = 4, 12
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    return build_model(get_preset("tiny-gpt-oss"), seed=7)


@pytest.fixture(scope="module")
def prompts(model):
    rng = np.random.default_rng(0)
    return [rng.integers(0, model.config.vocab_size, n).tolist() for n in (3, 17, 30, 44)]


@pytest.fixture(scope="module")
def expected(model, prompts):
    return [greedy_generate(model, p, MAX_TOKENS) for p in prompts]


def device_block_bytes(engine) -> list[int]:
    """Bytes of one block of each KV group, measured on the executor's device arrays."""
    ex = engine.executor
    return [sum(ex.kv[i][0].nbytes + ex.kv[i][1].nbytes for i in g.layers) // n
            for g, n in zip(ex.kv_groups, ex.group_num_blocks)]


def serve(model, prompts, **options):
    """Serve the prompts, checking the cache after every step -> (outputs, engine, facts seen).

    A step that computed one token at a block boundary allocated its block, freeing the window's
    expired ones: the request then holds exactly kv_bytes(cfg, n, BS) (measured on the device
    arrays). After such a step, while it keeps decoding, it holds at most one window block more
    (freed at its next allocation) and never more than window_blocks of the window's."""
    engine = build(model, max_model_len=64, block_size=BS, max_num_seqs=4, num_blocks=20, **options)
    cfg, kv = model.config, engine.scheduler.kv
    (window,) = [g.window for g in kv_groups(cfg) if g.window is not None]
    block_bytes = device_block_bytes(engine)
    reqs = [engine.add_request(p, GREEDY) for p in prompts]
    seen = {"freed_mid_request": False, "exact_steps": 0, "max_full_blocks": 0, "decode_steps": 0}
    last, decoding = {}, set()
    while engine.has_unfinished:
        seen["decode_steps"] = max(seen["decode_steps"], engine.step().plan.decode_steps)
        for r in engine.scheduler.running:
            full, (win,) = r.block_ids, r.group_block_ids
            assert len(full) == len(win) and FREED not in full
            seen["freed_mid_request"] |= FREED in win
            key, n = (r.request_id, r.num_preemptions), r.num_computed_tokens
            one_token, last[key] = n == last.get(key, -2) + 1, n
            live = [b for b in win if b != FREED]
            held = len(full) * block_bytes[0] + len(live) * block_bytes[1]
            if one_token and (n - 1) % BS == 0:
                assert held == kv_bytes(cfg, n, BS)
                seen["exact_steps"] += 1
                decoding.add(key)
            elif not one_token:  # admitted, resumed, a prompt chunk or decode steps: held until it next allocates
                decoding.discard(key)
            if key in decoding:
                assert kv_bytes(cfg, n, BS) <= held <= kv_bytes(cfg, n, BS) + block_bytes[1]
                assert len(live) <= window_blocks(window, BS) and len(full) == -(-n // BS)
            seen["max_full_blocks"] = max(seen["max_full_blocks"], len(full))
    assert kv.num_free_blocks == kv.num_blocks  # nothing leaked
    return [r.output_token_ids for r in reqs], engine, seen


@pytest.mark.slow
@pytest.mark.parametrize("options", [dict(policy="chunked", token_budget=16, max_decode_steps=1),
                                     dict(policy="no_chunk", token_budget=64), dict(policy="layered")],
                         ids=["chunked-one-step", "no_chunk", "layered"])
def test_greedy_matches_reference_with_windows_freed_and_preemption(model, prompts, expected, options):
    """One step per iteration: the held bytes are checked after every decode step; multi-step (8, the
    default) frees window blocks as it reserves the steps ahead."""
    outputs, engine, seen = serve(model, prompts, **options)
    assert outputs == expected
    assert seen["freed_mid_request"]
    if options.get("max_decode_steps") == 1:
        assert seen["exact_steps"] > 0
    else:
        assert seen["decode_steps"] > 1
    assert seen["max_full_blocks"] > window_blocks(16, BS) + 1  # full-attention blocks outgrew the window's
    if options["policy"] != "layered":  # 20 blocks for requests of up to 14: some wait or get preempted
        assert sum(r.num_preemptions for r in engine.finished) > 0


def test_cache_pools_and_block_bytes(model):
    """The window layers' pool is what the scheduler may use (every request's window plus a whole
    prompt), the full layers' what was asked; device blocks cost what the config says."""
    engine = build(model, max_model_len=64, block_size=BS, max_num_seqs=2, num_blocks=40)
    cfg = model.config
    assert engine.executor.group_num_blocks == engine.scheduler.kv.group_num_blocks == (40, 2 * 5 + 16)
    assert device_block_bytes(engine) == [group_block_bytes(cfg, g, BS) for g in kv_groups(cfg)]
    assert sum(device_block_bytes(engine)) == kv_block_bytes(cfg, BS)


def decode_plan(cfg, context: int) -> IterationPlan:
    s = RowSlice(0, context - 1, (1,), 0, cfg.num_layers, True, context)
    return IterationPlan(0, (s,), layer_groups([s], cfg.num_layers), {0: ()}, (), num_layers=cfg.num_layers)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_simulated_kv_traffic_agrees_with_kv_bytes(name):
    """A decode row reads every key its request holds: the simulator's per-layer KV read bytes (from
    keys_read per window, and Qwen3-Next's state slot) sum to kv_bytes of its context, below, at and
    past every window. (From context 2: a row at position 0 has no state to read yet.)"""
    cfg = get_preset(name)
    windows = {w for w in cfg.sliding_windows if w is not None}
    for context in sorted({2, 100, 5000, *windows, *(w + 1 for w in windows)}):
        stats = traffic.layer_stats(cfg, decode_plan(cfg, context))
        assert stats.kv_read_bytes.sum() == kv_bytes(cfg, context), (name, context)
        assert stats.kv_write_bytes.sum() == kv_bytes(cfg, 1)
