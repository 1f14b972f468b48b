"""KV hand-off between two engines in one process: engine A prefills and hands each request off with
its KV, engine B imports it into other blocks and decodes. Greedy and seeded outputs equal one
engine doing both, for every architecture (GPT-OSS: its window layers hand off only their window;
Qwen3-Next: its Gated DeltaNet layers their state slot, the same size for every prompt); payloads
of another model or with other shapes are rejected with what differs."""

import dataclasses
import functools

import numpy as np
import pytest

from moejax.config import get_preset
from moejax.engine import build
from moejax.engine.kv_transfer import KVTransferError
from moejax.engine.sampling import SamplingParams
from moejax.models.decoder import cache_layouts
from moejax.models.model import build_model

# Qwen3-Next compiles its own prefill tiles and state reads (~10 min on a loaded 2-core box): slow
ARCHS = ["tiny-qwen3-moe", "tiny-mixtral", "tiny-qwen2-moe", "tiny-olmoe", "tiny-gpt-oss",
         pytest.param("tiny-qwen3-next", marks=pytest.mark.slow)]
GREEDY = SamplingParams(max_tokens=8, ignore_eos=True)
SAMPLED = SamplingParams(max_tokens=8, temperature=0.8, top_p=0.9, seed=11, ignore_eos=True)


@functools.cache
def model_of(arch):
    return build_model(get_preset(arch), seed=3)


def engine(model):
    """Engines of one model and cache size share their compiled programs."""
    return build(model, max_model_len=64, block_size=4, token_budget=32, num_blocks=96)


def serve(e, requests):
    while e.has_unfinished:
        e.step()
    return [r.output_token_ids for r in requests]


@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_here_decode_there_equals_one_engine(arch):
    model = model_of(arch)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, model.config.vocab_size, n).tolist() for n in (9, 23, 4)]
    params = [GREEDY, SAMPLED, GREEDY]

    one = engine(model)
    want = serve(one, [one.add_request(p, sp) for p, sp in zip(prompts, params)])

    a = engine(model)
    handed = [a.add_request(p, sp, handoff=True) for p, sp in zip(prompts, params)]
    serve(a, handed)
    assert [r.finish_reason for r in handed] == ["handoff"] * 3
    assert a.scheduler.kv.num_free_blocks == a.scheduler.kv.num_blocks  # exported, then freed
    for h in a.handoffs:  # every layer as its cache declares it: KV of the prompt, its window, or a state slot
        assert [s.kind for s in h.kv.states] == [layout.kind for layout in cache_layouts(model.config)]
    blocks_a = {h.request_id: r.block_ids for h, r in zip(a.handoffs, handed)}

    b = engine(model)
    filler = b.add_request(rng.integers(0, model.config.vocab_size, 30).tolist(), GREEDY)
    b.step()  # the filler holds B's first blocks: the imports land elsewhere
    assert filler.block_ids
    continued = [b.add_prefilled(h) for h in a.handoffs]
    b.step()
    assert all(set(r.block_ids).isdisjoint(filler.block_ids) for r in continued)
    serve(b, continued + [filler])
    assert [r.output_token_ids for r in continued] == want
    assert all(r.num_preemptions == 0 for r in continued)
    assert len(blocks_a) == 3 and b.scheduler.kv.num_free_blocks == b.scheduler.kv.num_blocks


def test_bad_payloads_are_named_errors():
    qwen = build_model(get_preset("tiny-qwen3-moe"), seed=1)
    a = engine(qwen)
    a.add_request([5, 6, 7, 8, 9], GREEDY, handoff=True)
    serve(a, [])
    (good,) = a.handoffs

    mixtral = build_model(get_preset("tiny-mixtral"), seed=1)
    with pytest.raises(KVTransferError, match=r"from 'tiny-qwen3-moe' does not fit 'tiny-mixtral': architecture"):
        engine(mixtral).add_prefilled(good)

    b = engine(qwen)
    states = list(good.kv.states)
    states[2] = dataclasses.replace(states[2], arrays={"k": states[2].arrays["k"][:, :1], "v": states[2].arrays["v"]})
    cut = dataclasses.replace(good, kv=dataclasses.replace(good.kv, states=tuple(states)))
    with pytest.raises(KVTransferError, match=r"layer 2 k: shape \[5, 1, 32\] float32; expected \[5, 2, 32\]"):
        b.add_prefilled(cut)
    short = dataclasses.replace(good, prompt_token_ids=good.prompt_token_ids[:-1])
    with pytest.raises(KVTransferError, match="holds 5 tokens; the request has 4 computed tokens"):
        b.add_prefilled(short)
    half = dataclasses.replace(good, kv=dataclasses.replace(good.kv, layers=good.kv.layers[:2],
                                                            states=good.kv.states[:2]))
    with pytest.raises(KVTransferError, match=r"holds layers \[0, 1\]; importing needs all 4 layers"):
        b.add_prefilled(half)
    one = engine(qwen)
    want = serve(one, [one.add_request([5, 6, 7, 8, 9], GREEDY)])
    assert serve(b, [b.add_prefilled(good)]) == want  # the untouched payload still goes in


def test_window_layers_hand_off_only_their_window():
    """GPT-OSS: a 30-token prompt's window layers (window 16) carry the last 15 tokens, all the next
    token sees besides itself, its full-attention layers all 30; a full-length state in a window
    layer is refused."""
    model = model_of("tiny-gpt-oss")
    cfg = model.config
    a = engine(model)
    a.add_request(list(range(1, 31)), GREEDY, handoff=True)
    serve(a, [])
    (h,) = a.handoffs
    for layer, state in zip(h.kv.layers, h.kv.states):
        window = cfg.sliding_windows[layer]
        assert (state.kind, len(state.arrays["k"])) == (("paged", 30) if window is None else ("window", window - 1))
    full = dict(h.kv.states[1].arrays)  # layer 1 attends fully: all 30 tokens
    states = (dataclasses.replace(h.kv.states[0], arrays=full), *h.kv.states[1:])
    wrong = dataclasses.replace(h, kv=dataclasses.replace(h.kv, states=states))
    with pytest.raises(KVTransferError, match=r"layer 0 k: shape \[30, 2, 32\] float32; expected \[15, 2, 32\]"):
        engine(model).add_prefilled(wrong)
