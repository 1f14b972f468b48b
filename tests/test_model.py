"""The model's layer-range forward: ranges compose, incremental decode equals a full forward, rows of
different sequences do not interact, and padding rows reach no expert."""

import numpy as np
import pytest

from moejax import kernels
from moejax.config import get_preset
from moejax.engine.metadata import attention_metadata, pad_tokens
from moejax.models.model import build_model

BS = 4


@pytest.fixture(scope="module")
def model():
    return build_model(get_preset("tiny-qwen2-moe"), seed=1)  # MoE + a dense layer + shared expert


def forward(model, kv, tokens, positions, seq_ids, tables, ranges=None):
    nb = kv[0][0].shape[0]
    meta = attention_metadata(np.array(positions), np.array(seq_ids), tables, BS, nb)
    x = model.embed(pad_tokens(tokens, meta.positions.shape[0]))
    counts = []
    for start, end in ranges or [(0, model.config.num_layers)]:
        x, c = model.run_layers(x, kv, meta, start, end)
        counts += c
    return np.asarray(model.logits(x))[: len(tokens)], np.stack([np.asarray(c) for c in counts])


def test_layer_ranges_compose(model):
    tokens = list(range(1, 12))
    tables = np.arange(4, dtype=np.int32)[None]
    whole, c1 = forward(model, model.init_kv_cache(8, BS), tokens, range(11), [0] * 11, tables)
    split, c2 = forward(model, model.init_kv_cache(8, BS), tokens, range(11), [0] * 11, tables,
                        ranges=[(0, 1), (1, 3), (3, 4)])
    np.testing.assert_array_equal(whole, split)
    np.testing.assert_array_equal(c1, c2)
    cfg = model.config
    assert c1.shape == (cfg.num_layers, cfg.num_experts)
    for layer, is_moe in enumerate(cfg.moe_layers):  # every real row reaches top_k experts
        assert c1[layer].sum() == (11 * cfg.num_experts_per_tok if is_moe else 0)


def test_incremental_decode_equals_full_forward(model):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, model.config.vocab_size, 13).tolist()
    tables = np.array([[5, 2, 7, 0]], np.int32)  # scattered blocks
    full, _ = forward(model, model.init_kv_cache(8, BS), tokens, range(13), [0] * 13, tables)
    kv = model.init_kv_cache(8, BS)
    chunks = [(0, 6), (6, 7), (7, 12), (12, 13)]  # a chunked prefill, then single-token steps
    got = np.concatenate([forward(model, kv, tokens[a:b], range(a, b), [0] * (b - a), tables)[0]
                          for a, b in chunks])
    np.testing.assert_array_equal(got, full)


def test_sequences_in_one_batch_do_not_interact(model):
    """A sequence's logits are bit-identical alone (8 or 16 padded rows) and among others (128 rows):
    greedy tokens cannot depend on the batch (on CPU XLA's dot rounds a row differently at 16 and 128 rows)."""
    rng = np.random.default_rng(1)
    a, b, c = (rng.integers(0, 512, n).tolist() for n in (9, 5, 60))
    tables = np.array([[0, 1, 2], [3, 4, 5], [6, 7, 8]], np.int32)
    tables_c = np.arange(9, 24, dtype=np.int32)[None]
    alone_a, _ = forward(model, model.init_kv_cache(32, BS), a, range(9), [0] * 9, tables)
    alone_b, _ = forward(model, model.init_kv_cache(32, BS), b, range(5), [1] * 5, tables)
    all_tables = np.concatenate([tables, np.zeros((3, 15 - 3), np.int32)], axis=1)
    all_tables = np.concatenate([all_tables, tables_c])
    together, _ = forward(model, model.init_kv_cache(32, BS), b + a + c, [*range(5), *range(9), *range(60)],
                          [1] * 5 + [0] * 9 + [3] * 60, all_tables)
    np.testing.assert_array_equal(together[:5], alone_b)
    np.testing.assert_array_equal(together[5:14], alone_a)


def test_compilations_shared_by_layers_and_buckets(model):
    """All MoE layers share one compiled function, and so do all row counts within one bucket."""
    tables = np.arange(4, dtype=np.int32)[None]
    forward(model, model.init_kv_cache(8, BS), [1, 2, 3], range(3), [0] * 3, tables)
    fns = {k: f for k, f in model._fns.items() if k[0] == "layer"}
    assert len(fns) == 2  # MoE layers and the dense layer
    sizes = {k: f._cache_size() for k, f in fns.items()}
    forward(model, model.init_kv_cache(8, BS), [4, 5, 6, 7, 8], range(5), [0] * 5, tables)
    assert {k: f._cache_size() for k, f in fns.items()} == sizes


def test_gpt_oss_config_fields_from_hf():
    """What GPT-OSS's config.json decides: windows per `layer_types` (default: even layers slide), the
    clamped SwiGLU's constants, biases and sinks."""
    from moejax.config import from_hf_config

    hf = dict(model_type="gpt_oss", vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2, intermediate_size=16,
              sliding_window=6, swiglu_limit=5.0, swiglu_alpha=1.5, attention_bias=False,
              rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "truncate": False,
                               "original_max_position_embeddings": 4096})
    cfg = from_hf_config(hf)
    assert cfg.sliding_windows == (6, None, 6, None)
    assert (cfg.swiglu_limit, cfg.swiglu_alpha, cfg.qkv_bias, cfg.o_bias) == (5.0, 1.5, False, False)
    assert cfg.attention_sinks and cfg.router_bias and cfg.expert_bias and cfg.rope.truncate is False
    cfg = from_hf_config({**hf, "layer_types": ["full_attention", "sliding_attention"] * 2})
    assert cfg.sliding_windows == (None, 6, None, 6)
    model = build_model(cfg, seed=0)
    assert model.expert_activation == kernels.ClampedSwiGLU(alpha=1.5, limit=5.0)


def test_biased_router_is_softmax_over_the_top_k_biased_logits():
    """GPT-OSS routes by top-k of (logits + bias), softmax over those k (transformers' order); moejax's
    renormalised top-k of the full softmax must pick the same experts with the same weights."""
    model = build_model(get_preset("tiny-gpt-oss"), seed=3)
    y = np.random.default_rng(0).normal(size=(16, model.config.hidden_size)).astype(np.float32)
    h = np.asarray(model.layer_states[1]["post_attn_norm"]["weight"][...])  # route() norms h first
    normed = y / np.sqrt((y * y).mean(-1, keepdims=True) + model.config.rms_norm_eps) * h
    w, b = (np.asarray(model.layer_states[1]["router"][k][...], np.float64) for k in ("w", "b"))
    logits = normed @ w + b
    k = model.config.num_experts_per_tok
    want_ids = np.argsort(-logits, axis=1)[:, :k]
    top = np.take_along_axis(logits, want_ids, axis=1)
    want_weights = np.exp(top - top.max(1, keepdims=True))
    want_weights /= want_weights.sum(1, keepdims=True)
    _, weights, ids = model.route(1, y, np.ones(16, bool))
    np.testing.assert_array_equal(np.asarray(ids), want_ids)
    np.testing.assert_allclose(np.asarray(weights), want_weights, rtol=1e-5, atol=1e-6)
