"""DeepSeek (MLA) on the engine: the latent cache is what the KV accounting counts, greedy outputs
equal the reference generation under every policy (prompt chunks mixed with decode rows), the KV
hand-off carries the latent cache from one engine to another, and the 8-device layouts (requests,
experts and heads split) give the single-device logits."""

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
    return [rng.integers(0, model.config.vocab_size, n).tolist() for n in (3, 37, 12, 1)]


def serve(engine, requests):
    while engine.has_unfinished:
        engine.step()
    assert engine.scheduler.kv.num_free_blocks == engine.scheduler.kv.num_blocks
    return [r.output_token_ids for r in requests]


def engine(model, **options):
    """Engines of one model and cache size share their compiled programs."""
    return build(model, max_model_len=64, block_size=4, num_blocks=64, **options)


def test_declared_latent_cache_is_what_kv_accounting_counts(model):
    """The cache holds each token's latent and rope key (not per-head K/V), and kv_block_bytes (what
    sizes the cache and prices KV traffic) counts exactly its bytes."""
    cfg, m = model.config, model.config.mla
    kv = model.init_kv_cache(num_blocks=6, block_size=4)
    assert all([a.shape for a in layer] == [(6, 4, m.kv_lora_rank), (6, 4, m.qk_rope_head_dim)] for layer in kv)
    assert sum(a.nbytes for layer in kv for a in layer) == 6 * kv_block_bytes(cfg, 4)
    assert [layout.elems_per_token for layout in cache_layouts(cfg)] == \
        [cfg.kv_elems_per_token(i) for i in range(cfg.num_layers)]


@pytest.mark.parametrize("options", [dict(policy="chunked", token_budget=16), dict(policy="layered")],
                         ids=["chunked-16", "layered"])
def test_policies_match_reference(model, prompts, options):
    want = [greedy_generate(model, p, GREEDY.max_tokens) for p in prompts]
    e = engine(model, **options)
    assert serve(e, [e.add_request(p, GREEDY) for p in prompts]) == want


def test_kv_handoff_carries_the_latent_cache():
    model = build_model(get_preset("tiny-deepseek-v2"), seed=3)  # V2-Lite's form: q without LoRA
    m = model.config.mla
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, model.config.vocab_size, n).tolist() for n in (9, 23)]
    one = engine(model)
    want = serve(one, [one.add_request(p, GREEDY) for p in prompts])

    a = engine(model)
    serve(a, [a.add_request(p, GREEDY, handoff=True) for p in prompts])
    handoffs = sorted(a.handoffs, key=lambda h: h.request_id)
    payload = handoffs[1].kv
    assert {s.kind for s in payload.states} == {"latent"}
    assert payload.states[0].arrays["latent"].shape == (23, m.kv_lora_rank)
    assert payload.states[0].arrays["k_rope"].shape == (23, m.qk_rope_head_dim)
    assert payload.nbytes == 23 * model.config.num_layers * (m.kv_lora_rank + m.qk_rope_head_dim) * 4

    b = engine(model)
    filler = b.add_request(rng.integers(0, model.config.vocab_size, 30).tolist(), GREEDY)
    b.step()  # the filler holds B's first blocks: the imports land elsewhere
    continued = [b.add_prefilled(h) for h in handoffs]
    assert serve(b, continued + [filler])[:2] == want

    states = list(payload.states)
    states[1] = LayerKVState("paged", {"k": np.zeros((23, 4, 24), np.float32), "v": np.zeros((23, 4, 24), np.float32)})
    gqa_shaped = dataclasses.replace(handoffs[1], kv=dataclasses.replace(payload, states=tuple(states)))
    with pytest.raises(KVTransferError, match=r"layer 1: kind 'paged' with arrays \['k', 'v'\]; "
                                              r"expected 'latent' with latent and k_rope"):
        engine(model).add_prefilled(gqa_shaped)


@pytest.mark.parametrize("layout", ["cpu8-ep", "cpu8-dp", "cpu8-ep4-tp2"])
def test_layouts_give_single_device_logits(model, layout):
    """Requests over 8 data shards (the latent cache's blocks with them), experts over 8 or 4 shards,
    heads over 2 tensor shards (each keeps the whole latent cache)."""
    prompt = [(13 * i + 5) % 500 for i in range(37)]
    sharded, _ = load_model("tiny-deepseek-v3", seed=5, layout=layout)
    np.testing.assert_allclose(prompt_logits(sharded, prompt), prompt_logits(model, prompt), rtol=1e-5, atol=1e-5)
