"""Routing models: statistics of each model, the large-n approximation against per-token sampling,
trace replay, and the per-plan draw."""

import numpy as np
import pytest

from moejax.config import get_preset
from moejax.engine.plan import IterationPlan, RowSlice, layer_groups
from moejax.sim.routing import (EXACT_MAX_TOKENS, CorrelatedRouting, Rows, TraceRouting,
                                UniformRouting, ZipfRouting, activation_curve, fit_correlated,
                                inclusion_probabilities, load_trace, make_routing,
                                plan_expert_tokens, save_trace)

E, K = 128, 8


def uniform_distinct(n, e=E, k=K):
    return e * (1 - (1 - k / e) ** n)


def test_inclusion_probabilities():
    rng = np.random.default_rng(0)
    w = rng.pareto(1.0, (3, E)) + 0.01
    pi = inclusion_probabilities(w, K)
    np.testing.assert_allclose(pi.sum(-1), K, rtol=1e-9)
    assert (pi > 0).all() and (pi <= 1).all()
    assert (np.diff(pi[0][np.argsort(w[0])]) >= 0).all()  # heavier experts are more likely
    np.testing.assert_allclose(inclusion_probabilities(np.ones(E), K), K / E)


@pytest.mark.parametrize("n", [1, 4, EXACT_MAX_TOKENS, 40, 128, 1024])
def test_uniform_matches_expected_distinct(n):
    """E(1 − (1 − k/E)^n) on both sides of EXACT_MAX_TOKENS; a single token activates exactly k."""
    model = UniformRouting(4, E, K)
    curve = activation_curve(model, layer=2, token_counts=[n], trials=400, seed=n)
    assert curve[0] == pytest.approx(uniform_distinct(n), rel=0.006)
    if n == 1:
        assert curve[0] == K


def test_draws_have_k_picks_per_token_and_independent_layers():
    model = UniformRouting(6, E, K)
    rng = np.random.default_rng(0)
    for n in (5, 300):
        rows = Rows.of([(1, n - 2), (2, 2)])
        counts = model.draw_layers(np.arange(6), rows, rng)
        assert counts.shape == (6, E) and counts.dtype == np.int64
        assert (counts >= 0).all() and (counts <= n).all()
        if n <= EXACT_MAX_TOKENS:
            assert (counts.sum(1) == n * K).all()
        assert not (counts == counts[0]).all()  # each layer draws afresh


def test_zipf_is_skewed_and_hot_experts_differ_per_layer():
    model = ZipfRouting(8, E, K, exponent=1.2, seed=0)
    rng = np.random.default_rng(0)
    counts = model.draw_layers(np.arange(8), Rows.of([(0, 20000)]), rng)  # [8, E]
    share = np.sort(counts, axis=1)[:, ::-1].cumsum(1) / counts.sum(1, keepdims=True)
    assert (share[:, E // 10 - 1] > 0.35).all()  # top 10% of experts take over a third of the picks
    assert len(set(counts.argmax(1))) >= 6  # the hottest expert moves from layer to layer
    assert model.expected_distinct(0, 128) < uniform_distinct(128) - 3
    flat = ZipfRouting(2, E, K, exponent=0.0)
    assert flat.expected_distinct(0, 32) == pytest.approx(uniform_distinct(32))


def test_correlated_sequence_locality():
    model = CorrelatedRouting(4, E, K, seed=0)
    counts = [8, 32, 128, 512]
    sequence = activation_curve(model, 1, counts, trials=40, seed=1)
    batch = activation_curve(model, 1, counts, trials=40, seed=1, batch=True)
    uniform = uniform_distinct(np.array(counts))
    assert (sequence[:3] < uniform[:3] - 1).all()  # below uniform short of saturation
    assert sequence[3] <= uniform[3]
    assert (sequence[:3] < batch[:3] - 5).all()  # one request's tokens share experts; a batch's do not
    # default parameters: a 128-token chunk activates ~86% of 128 experts (the layered-prefill paper)
    mean_128 = np.mean([model.expected_distinct(layer, 128) for layer in range(4)])
    assert mean_128 / E == pytest.approx(0.86, abs=0.015)
    assert sequence[2] / E == pytest.approx(0.86, abs=0.03)


def test_fit_correlated_hits_target():
    model = fit_correlated(4, 32, 4, target_fraction=0.7, tokens=32)
    got = np.mean([model.expected_distinct(layer, 32) for layer in range(4)]) / 32
    assert got == pytest.approx(0.7, abs=0.02)
    with pytest.raises(ValueError, match="outside"):
        fit_correlated(4, 32, 4, target_fraction=0.05, tokens=32)


@pytest.mark.parametrize("model", [
    UniformRouting(4, E, K),
    ZipfRouting(4, E, K, exponent=1.5, seed=1),
    CorrelatedRouting(4, E, K, seed=2),
    CorrelatedRouting(4, E, K, affinity=100.0, seed=3),
    CorrelatedRouting(4, 32, 4, seed=4),
], ids=["uniform", "zipf1.5", "correlated", "correlated-aff100", "correlated-E32k4"])
def test_large_n_approximation_against_per_token_sampling(model):
    """The approximate draw (used above EXACT_MAX_TOKENS rows) against exact per-token Plackett–Luce
    sampling of the same rows: mean distinct experts within 1% of E for E = 128, k = 8 and 2% for
    E = 32, k = 4 (measured bias: ≤ 0.8% and ≤ 1.4%), total picks n·k within 2%, per-expert means
    within noise plus Rosén's ≤ 10% per-expert error."""
    rng = np.random.default_rng(0)
    layers = np.arange(model.num_layers)
    for n in (24, 96, 400):
        for rows in (Rows.of([(7, n)]), Rows.of([(100 + i, 1) for i in range(n)])):
            exact = np.stack([model._draw_exact(layers, rows, rng) for _ in range(60)])
            approx = np.stack([model._draw_approx(layers, rows, rng) for _ in range(60)])
            e = model.num_experts
            d_exact, d_approx = (exact > 0).sum(-1).mean(), (approx > 0).sum(-1).mean()
            assert abs(d_approx - d_exact) < (0.01 if e == 128 else 0.02) * e, (n, d_exact, d_approx)
            assert approx.sum(-1).mean() == pytest.approx(n * model.top_k, rel=0.02)
            noise = 5 * np.sqrt(exact.var(0) / 60 + approx.var(0) / 60) + 0.1
            assert (np.abs(approx.mean(0) - exact.mean(0)) < noise + 0.1 * exact.mean(0)).all()


def _toy_trace(rng, lens=(50, 30, 70), L=3, num_experts=16, k=2):
    T = sum(lens)
    ids = np.stack([np.stack([rng.choice(num_experts, k, replace=False) for _ in range(L)]) for _ in range(T)])
    return ids, np.array(lens)  # [T, L, K]


def test_trace_replay_reproduces_recorded_counts(tmp_path):
    rng = np.random.default_rng(0)
    ids, lens = _toy_trace(rng)
    path = tmp_path / "trace.npz"
    save_trace(path, ids, lens, num_experts=16)
    trace = load_trace(path, seed=5)
    offsets = np.cumsum(lens) - lens
    for request in range(10):
        seq = trace.token_index(Rows.of([(request, 1)]))[0]
        s = int(np.searchsorted(offsets, seq, side="right") - 1)  # the recorded sequence it replays
        assert seq == offsets[s]
        recorded = np.bincount(ids[offsets[s]:offsets[s] + lens[s], 1].ravel(), minlength=16)
        whole = trace.draw(1, Rows.of([(request, lens[s])]), rng)
        np.testing.assert_array_equal(whole, recorded)
        # two consecutive slices continue the sequence: their counts add up to the whole
        half = lens[s] // 2
        parts = trace.draw(1, Rows.of([(request, half, 0)]), rng) + \
            trace.draw(1, Rows.of([(request, lens[s] - half, half)]), rng)
        np.testing.assert_array_equal(parts, recorded)
        # past its end a request wraps around its sequence
        np.testing.assert_array_equal(trace.draw(1, Rows.of([(request, 3 * lens[s])]), rng), 3 * recorded)


def test_trace_validation_and_make_routing(tmp_path):
    rng = np.random.default_rng(0)
    cfg = get_preset("tiny-qwen3-moe")  # L=4, E=16, K=4
    ids, lens = _toy_trace(rng, L=4, k=4)
    save_trace(tmp_path / "ok.npz", ids, lens, num_experts=16)
    assert isinstance(make_routing("trace", cfg, path=tmp_path / "ok.npz"), TraceRouting)
    save_trace(tmp_path / "bad.npz", ids[:, :3], lens, num_experts=16)
    with pytest.raises(ValueError, match="trace has L=3"):
        make_routing("trace", cfg, path=tmp_path / "bad.npz")
    with pytest.raises(ValueError, match="needs path"):
        make_routing("trace", cfg)
    with pytest.raises(ValueError, match="sum to num_tokens"):
        TraceRouting(ids, lens[:-1], 16)
    with pytest.raises(ValueError, match="unknown routing model 'zip'.*uniform, zipf, correlated, trace"):
        make_routing("zip", cfg)
    with pytest.raises(ValueError, match="no experts"):
        make_routing("uniform", get_preset("qwen3-8b"))
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="not a routing trace"):
        load_trace(tmp_path / "other.npz")


def test_plan_expert_tokens_follow_layer_groups():
    """Decode rows pass every layer, a 2K-token prompt only layers [8, 16): those layers see it."""
    cfg = get_preset("qwen3-30b-a3b")
    L = cfg.num_layers
    slices = [RowSlice(i, 500, (1,), 0, L, True, 501) for i in range(4)]
    slices.append(RowSlice(99, 0, (1,) * 2048, 8, 16, False, 2048))
    plan = IterationPlan(0, tuple(slices), layer_groups(slices, L), {}, (), num_layers=L)
    counts = plan_expert_tokens(cfg, plan, make_routing("correlated", cfg, seed=0), np.random.default_rng(0))
    assert counts.shape == (L, cfg.num_experts)
    distinct = (counts > 0).sum(1)
    assert (distinct[8:16] > 100).all() and (distinct[:8] <= 4 * K).all() and (distinct[16:] <= 4 * K).all()
    # deepseek-v3's first three layers are dense: no expert tokens there
    ds = get_preset("deepseek-v3")
    plan = IterationPlan(0, (RowSlice(0, 0, (1,) * 64, 0, ds.num_layers, True, 64),),
                         layer_groups([RowSlice(0, 0, (1,) * 64, 0, ds.num_layers, True, 64)], ds.num_layers),
                         {}, (), num_layers=ds.num_layers)
    counts = plan_expert_tokens(ds, plan, make_routing("uniform", ds), np.random.default_rng(0))
    assert (counts[:3] == 0).all() and (counts[3:] > 0).any(axis=1).all()
