"""DeepSeek (MLA) on the engine: the latent cache is what the KV accounting counts, greedy outputs
equal the reference generation under every policy (prompt chunks mixed with decode rows, then
several decode steps per program), the KV hand-off carries the latent cache from one engine to
another, and the 8-device layouts (requests or experts split) give the single-device logits.

One model and one cache size throughout, so that the engines share their compiled programs; the
V2-Lite form (q without LoRA) serves in tests/test_parity_hf.py's batched generate."""

import dataclasses

import numpy as np
import pytest

from moejax.checkpoint import load_model
from moejax.config import get_preset
from moejax.engine import build
from moejax.engine.kv_cache import kv_block_bytes
from moejax.engine.kv_transfer import KVTransferError, LayerKVState
from moejax.engine.sampling import SamplingParams
from moejax.models.decoder import cache_layouts
from moejax.models.model import build_model
from moejax.models.reference import greedy_generate, prompt_logits

GREEDY = SamplingParams(max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    return build_model(get_preset("tiny-deepseek-v3"), seed=5)


@pytest.fixture(scope="module")
def prompts(model):
    rng = np.random.default_rng(0)
    return [rng.integers(0, model.config.vocab_size, n).tolist() for n in (3, 37, 6, 1)]


@pytest.fixture(scope="module")
def want(model, prompts):
    # one block of 64 holds every prompt's private cache: one cache shape, fewer programs to compile
    return [greedy_generate(model, p, GREEDY.max_tokens, block_size=64) for p in prompts]


def serve(engine, requests):
    plans = []
    while engine.has_unfinished:
        plans.append(engine.step().plan)
    assert engine.scheduler.kv.num_free_blocks == engine.scheduler.kv.num_blocks
    return [r.output_token_ids for r in requests], plans


def engine(model, **options):
    return build(model, max_model_len=64, block_size=4, num_blocks=64, **{"token_budget": 16, **options})


def test_declared_latent_cache_is_what_kv_accounting_counts(model):
    """The cache holds each token's latent and rope key (not per-head K/V), and kv_block_bytes (what
    sizes the cache and prices KV traffic) counts exactly its bytes."""
    cfg, m = model.config, model.config.mla
    kv = model.init_kv_cache(num_blocks=6, block_size=4)
    assert all([a.shape for a in layer] == [(6, 4, m.kv_lora_rank), (6, 4, m.qk_rope_head_dim)] for layer in kv)
    assert sum(a.nbytes for layer in kv for a in layer) == 6 * kv_block_bytes(cfg, 4)
    assert [layout.elems_per_token for layout in cache_layouts(cfg)] == \
        [cfg.kv_elems_per_token(i) for i in range(cfg.num_layers)]


@pytest.mark.parametrize("options", [dict(policy="chunked"), dict(policy="layered")])
def test_policies_match_reference(model, prompts, want, options):
    e = engine(model, **options)
    got, plans = serve(e, [e.add_request(p, GREEDY) for p in prompts])
    assert got == want
    assert any(p.decode_steps > 1 for p in plans)  # decode steps ran several to a program too


def test_kv_handoff_carries_the_latent_cache(model, prompts, want):
    m = model.config.mla
    a = engine(model)
    serve(a, [a.add_request(p, GREEDY, handoff=True) for p in prompts[1:3]])
    handoffs = sorted(a.handoffs, key=lambda h: h.request_id)
    payload = handoffs[0].kv
    assert {s.kind for s in payload.states} == {"latent"}
    assert payload.states[0].arrays["latent"].shape == (37, m.kv_lora_rank)
    assert payload.states[0].arrays["k_rope"].shape == (37, m.qk_rope_head_dim)
    assert payload.nbytes == 37 * model.config.num_layers * (m.kv_lora_rank + m.qk_rope_head_dim) * 4

    b = engine(model)
    filler = b.add_request(prompts[0], GREEDY)
    b.step()  # the filler holds B's first blocks: the imports land elsewhere
    continued = [b.add_prefilled(h) for h in handoffs]
    assert serve(b, continued + [filler])[0] == want[1:3] + want[:1]

    states = list(payload.states)
    states[1] = LayerKVState("paged", {"k": np.zeros((37, 4, 24), np.float32), "v": np.zeros((37, 4, 24), np.float32)})
    gqa_shaped = dataclasses.replace(handoffs[0], kv=dataclasses.replace(payload, states=tuple(states)))
    with pytest.raises(KVTransferError, match=r"layer 1: kind 'paged' with arrays \['k', 'v'\]; "
                                              r"expected 'latent' with latent and k_rope"):
        b.add_prefilled(gqa_shaped)


PROMPT = [(13 * i + 5) % 500 for i in range(37)]


@pytest.fixture(scope="module")
def single_device_logits(model):
    return prompt_logits(model, PROMPT)


@pytest.mark.parametrize("layout", ["cpu8-ep", "cpu8-dp",
                                    pytest.param("cpu8-ep4-tp2", marks=pytest.mark.slow)])
def test_layouts_give_single_device_logits(single_device_logits, layout):
    """Requests over 8 data shards (the latent cache's blocks with them), experts over 8 or 4 shards,
    heads over 2 tensor shards (each keeps the whole latent cache)."""
    sharded, _ = load_model("tiny-deepseek-v3", seed=5, layout=layout)
    np.testing.assert_allclose(prompt_logits(sharded, PROMPT), single_device_logits, rtol=1e-5, atol=1e-5)
