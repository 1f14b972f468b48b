"""SimExecutor on hand-built plans: the Executor protocol, layer groups, determinism, speed."""

import time

import numpy as np
import pytest

from moejax.config import get_preset
from moejax.engine.executor import Executor
from moejax.engine.plan import IterationPlan, RowSlice, layer_groups
from moejax.sim.cost_model import Calibration
from moejax.sim.executor import SimExecutor
from moejax.sim.routing import UniformRouting

CAL = Calibration(scale=1.0, kernel_overhead_s=3e-6)


def make_plan(cfg, slices):
    return IterationPlan(0, tuple(slices), layer_groups(slices, cfg.num_layers), {}, (),
                         num_layers=cfg.num_layers)


def decode(cfg, count, position=1000):
    return [RowSlice(i, position, (5,), 0, cfg.num_layers, True, position + 1) for i in range(count)]


def test_executor_protocol_and_sampled_rows():
    cfg = get_preset("qwen3-30b-a3b").replace(eos_token_ids=(0, 1))
    ex: Executor = SimExecutor(cfg, "h100x2", "uniform", seed=0, calibration=CAL)
    assert ex.config is cfg
    # a prompt chunk that is not the prompt's end is not sampled
    plan = make_plan(cfg, decode(cfg, 3) + [RowSlice(10, 0, (7,) * 512, 0, 48, False, 512)])
    result = ex.execute(plan)
    assert result.sampled == {0: 2, 1: 2, 2: 2}  # first non-EOS token
    assert result.elapsed_s > 0 and result.energy_j > 0
    stats = result.layer_stats
    np.testing.assert_array_equal(stats.tokens, np.full(48, 515))
    assert stats.expert_tokens.shape == (48, 128)
    np.testing.assert_array_equal(stats.distinct_experts, (stats.expert_tokens > 0).sum(1))
    np.testing.assert_allclose(stats.expert_bytes, stats.distinct_experts * 3 * 2048 * 768 * 2)
    assert stats.expert_tokens.sum(1) == pytest.approx(np.full(48, 515 * 8), rel=0.05)


def test_layered_plan_prices_each_layer_for_the_rows_that_pass_it():
    """Decode rows on every layer, a 4K prompt on layers [12, 24): only those layers read most
    experts and write the prompt's KV, and the prompt adds about a quarter (12 of 48 layers) of
    what it adds when it passes all layers."""
    cfg = get_preset("qwen3-30b-a3b")
    ex = SimExecutor(cfg, "h100x2", "uniform", seed=1, calibration=CAL)
    base = ex.execute(make_plan(cfg, decode(cfg, 8)))
    plan = make_plan(cfg, decode(cfg, 8) + [RowSlice(50, 0, (3,) * 4096, 12, 24, False, 4096)])
    result = ex.execute(plan)
    distinct = result.layer_stats.distinct_experts
    assert (distinct[12:24] == 128).all() and (distinct[:12] < 100).all() and (distinct[24:] < 100).all()
    kv_write = result.layer_stats.kv_write_bytes
    assert (kv_write[12:24] == (8 + 4096) * 1024 * 2).all() and (kv_write[:12] == 8 * 1024 * 2).all()
    assert result.sampled.keys() == set(range(8))
    whole = ex.execute(make_plan(cfg, decode(cfg, 8) + [RowSlice(50, 0, (3,) * 4096, 0, 48, False, 4096)]))
    share = (result.elapsed_s - base.elapsed_s) / (whole.elapsed_s - base.elapsed_s)
    assert share == pytest.approx(12 / 48, rel=0.1)


def test_seeded_determinism():
    cfg = get_preset("gpt-oss-20b")
    plan = make_plan(cfg, decode(cfg, 40))
    a = SimExecutor(cfg, "h100", "zipf", seed=3).execute(plan)
    b = SimExecutor(cfg, "h100", "zipf", seed=3).execute(plan)
    c = SimExecutor(cfg, "h100", "zipf", seed=4).execute(plan)
    np.testing.assert_array_equal(a.layer_stats.expert_tokens, b.layer_stats.expert_tokens)
    assert a.elapsed_s == b.elapsed_s and a.energy_j == b.energy_j
    assert not np.array_equal(a.layer_stats.expert_tokens, c.layer_stats.expert_tokens)


def test_dense_model_and_routing_instances():
    dense = get_preset("qwen3-8b")
    result = SimExecutor(dense, "a100x2", seed=0).execute(make_plan(dense, decode(dense, 4)))
    assert result.layer_stats.expert_tokens is None and result.layer_stats.total_expert_bytes == 0
    cfg = get_preset("mixtral-8x7b")
    ex = SimExecutor(cfg, "h100x4", UniformRouting(cfg.num_layers, 8, 2), seed=0)
    result = ex.execute(make_plan(cfg, decode(cfg, 1)))
    assert (result.layer_stats.distinct_experts == 2).all()  # one token: exactly top-2
    with pytest.raises(ValueError, match="unknown hardware"):
        SimExecutor(cfg, "tpu-v9", seed=0)
    with pytest.raises(ValueError, match="needs a routing model"):
        SimExecutor(cfg, "h100", routing=None)


def test_default_calibration_comes_from_the_json():
    cfg = get_preset("qwen3-30b-a3b")
    ex = SimExecutor(cfg, "h100x2", seed=0)
    assert ex.cost_model.calibration.kernel_overhead_s > 0


def test_host_time_per_iteration():
    """A 48-layer Qwen3-30B-A3B iteration with 256 decode rows and a 4K-token prefill must cost well
    under 5 ms of host time (thousands of iterations per simulated run)."""
    cfg = get_preset("qwen3-30b-a3b")
    plan = make_plan(cfg, decode(cfg, 256) + [RowSlice(999, 0, (3,) * 4096, 0, 48, True, 4096)])
    for routing in ("uniform", "correlated"):
        ex = SimExecutor(cfg, "h100x2", routing, seed=0)
        ex.execute(plan)
        times = []
        for _ in range(20):
            t0 = time.perf_counter()
            ex.execute(plan)
            times.append(time.perf_counter() - t0)
        assert np.median(times) < 5e-3, (routing, np.median(times))
