"""Routing traces recorded from real forwards (moejax.sim.traces) and the calibration of the
correlated routing model: a trace holds exactly the experts the model's MoE layers count, replays
them through the simulator's draw, and fit_correlated hits its target activation."""

from pathlib import Path

import numpy as np
import pytest

from moejax.checkpoint import load_model
from moejax.config import get_preset
from moejax.engine.metadata import attention_metadata, bucket, pad_tokens
from moejax.sim.routing import Rows, activation_curve, fit_correlated, make_routing, request_hash
from moejax.sim.traces import moe_layers, record_trace, trace_activation_curve, trace_layer_counts

FIXTURES = Path(__file__).parent / "fixtures" / "hf"


def run_layers_counts(model, prompt, block_size=16):
    """[L, E] tokens per expert each layer reports in the model's own forward (Model.run_layers)."""
    n = len(prompt)
    nb = -(-n // block_size)
    meta = attention_metadata(np.arange(n), np.zeros(n), np.arange(nb, dtype=np.int32)[None], block_size, nb,
                              row_bucket=bucket(n))
    x = model.embed(pad_tokens(prompt, meta.positions.shape[0]))
    _, counts = model.run_layers(x, model.init_kv_cache(nb, block_size), meta)
    assert len(counts) == model.config.num_layers
    assert all(np.shape(c) == (model.config.num_experts,) for c in counts)  # tokens per expert, per layer
    return np.stack([np.asarray(c) for c in counts])


@pytest.mark.parametrize("source", ["tiny-moe-64x4", str(FIXTURES / "qwen2_moe")])
def test_record_trace_matches_the_models_expert_counts(source, tmp_path):
    model, _ = load_model(source)
    cfg = model.config
    rng = np.random.default_rng(0)
    # 33..48 tokens: one row bucket and one KV size, so each forward compiles once
    prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (37, 48)]
    prompts.append([5, 6, 7] * 11)  # repeated tokens
    path = tmp_path / "trace.npz"
    trace = record_trace(model, prompts, path)
    assert path.exists()
    assert (trace.num_layers, trace.num_experts, trace.top_k) == \
        (cfg.num_layers, cfg.num_experts, cfg.num_experts_per_tok)
    assert trace.seq_lens.tolist() == [len(p) for p in prompts]
    dense = [i for i in range(cfg.num_layers) if not cfg.moe_layers[i]]
    assert (trace.expert_ids[dense] == -1).all()
    assert moe_layers(trace).tolist() == np.flatnonzero(cfg.moe_layers).tolist()
    # a request id replaying each sequence (replay picks sequence request_hash(id) mod S)
    seq_of = request_hash(np.arange(1000), trace.seed) % np.uint64(len(prompts))
    rid = {s: int(np.flatnonzero(seq_of == s)[0]) for s in range(len(prompts))}
    for s, prompt in enumerate(prompts):
        expected = run_layers_counts(model, prompt)
        recorded = trace_layer_counts(trace, s)
        np.testing.assert_array_equal(recorded, expected)
        assert (recorded.sum(1)[list(np.flatnonzero(cfg.moe_layers))] == len(prompt) * cfg.num_experts_per_tok).all()
        # the simulator's replay of that sequence draws the same counts
        replay = trace.draw_layers(np.arange(cfg.num_layers), Rows.of([(rid[s], len(prompt))]),
                                   np.random.default_rng(0))
        np.testing.assert_array_equal(replay, expected)
    # the replay routes through make_routing like any model of that shape
    assert make_routing("trace", cfg, path=str(path)).num_experts == cfg.num_experts


def test_trace_activation_curve_counts_distinct_experts(tmp_path):
    """A hand-made trace: sequence 0 always picks experts {0, 1}, sequence 1 cycles over all 8."""
    from moejax.sim.routing import load_trace, save_trace

    ids = np.zeros((40, 1, 2), np.int64)
    ids[:20, 0] = [0, 1]
    ids[20:, 0, 0] = np.arange(20) % 8
    ids[20:, 0, 1] = (np.arange(20) + 1) % 8
    save_trace(tmp_path / "t.npz", ids, np.array([20, 20]), 8)
    trace = load_trace(tmp_path / "t.npz")
    seq = trace_activation_curve(trace, [1, 4, 20, 21], trials=50)
    assert seq[0] == 2
    assert 2 < seq[1] < 5 and seq[2] == pytest.approx(5)  # (2 + 8) / 2
    assert np.isnan(seq[3])  # no sequence has 21 tokens
    assert trace_activation_curve(trace, [1], batch=True)[0] == 2


@pytest.mark.parametrize("target", [0.7, 0.86, 0.95])
def test_fit_correlated_hits_its_target(target):
    cfg = get_preset("qwen3-30b-a3b")
    L, E, k = cfg.num_layers, cfg.num_experts, cfg.num_experts_per_tok
    model = fit_correlated(L, E, k, target, tokens=128)
    expected = np.mean([model.expected_distinct(layer, 128) for layer in range(L)]) / E
    assert expected == pytest.approx(target, abs=0.01)
    # and the simulator's draws agree (the approximate draw overestimates by at most ~1% of E)
    drawn = np.mean([activation_curve(model, layer, [128], trials=40, seed=layer)[0] for layer in range(0, L, 6)])
    assert drawn / E == pytest.approx(target, abs=0.025)


def test_activation_curve_replays_traces_beyond_their_first_token(tmp_path):
    """activation_curve gives each request a random start, so a trace's decode batch reads tokens
    from anywhere in its sequences (every first token here picks {0, 1}; later ones 2..7)."""
    from moejax.sim.routing import load_trace, save_trace

    ids = np.zeros((4 * 16, 1, 2), np.int64)
    for s in range(4):
        ids[s * 16 + 1:(s + 1) * 16, 0] = [2 + s, 6 - s // 2]
        ids[s * 16, 0] = [0, 1]
    save_trace(tmp_path / "t.npz", ids, np.full(4, 16), 8)
    trace = load_trace(tmp_path / "t.npz")
    assert activation_curve(trace, 0, [8], trials=20, batch=True)[0] > 3
