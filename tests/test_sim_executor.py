"""SimExecutor on hand-built plans: the Executor protocol, layer groups, determinism, calibration."""

import json
from pathlib import Path

import numpy as np
import pytest

from moejax.config import get_preset
from moejax.engine.executor import Executor
from moejax.engine.plan import IterationPlan, RowSlice, layer_groups
from moejax.sim import cost_model
from moejax.sim.cost_model import Calibration, save_calibration
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
    # a prompt chunk that is not the prompt's end is not sampled
    plan = make_plan(cfg, decode(cfg, 3) + [RowSlice(10, 0, (7,) * 512, 0, 48, False, 512)])
    result = ex.execute(plan)
    assert result.sampled == {0: 2, 1: 2, 2: 2}  # first non-EOS token
    assert result.elapsed_s > 0 and result.energy_j > 0
    stats = result.layer_stats
    np.testing.assert_array_equal(stats.tokens, np.full(48, 515))
    assert stats.expert_tokens.shape == (48, 128)
    np.testing.assert_array_equal(stats.distinct_experts, (stats.expert_tokens > 0).sum(1))
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
    # the prompt's layers read every expert: 128 x (gate, up, down) of 2048 x 768, bf16
    np.testing.assert_array_equal(result.layer_stats.expert_bytes[12:24], 128 * 3 * 2048 * 768 * 2)
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
    # two experts' (gate, up, down) of 4096 x 14336 in bf16 per layer
    np.testing.assert_array_equal(result.layer_stats.expert_bytes, 2 * 3 * 4096 * 14336 * 2)
    with pytest.raises(ValueError, match="unknown hardware"):
        SimExecutor(cfg, "tpu-v9", seed=0)
    with pytest.raises(ValueError, match="needs a routing model"):
        SimExecutor(cfg, "h100", routing=None)


def test_default_calibration_is_the_json_entry_for_the_hardware(tmp_path, monkeypatch):
    """Without a calibration the executor prices with calibration.json's entry for its hardware."""
    entries = json.loads(Path(cost_model.__file__).with_name("calibration.json").read_text())
    entry = entries.get("h100x2", entries["default"])  # the shipped file, read here
    cfg = get_preset("qwen3-30b-a3b")
    plan = make_plan(cfg, decode(cfg, 8) + [RowSlice(50, 0, (3,) * 512, 0, 48, False, 512)])

    def priced(calibration=None):
        return SimExecutor(cfg, "h100x2", seed=0, calibration=calibration).execute(plan).elapsed_s

    assert SimExecutor(cfg, "h100x2", seed=0).cost_model.calibration == Calibration(**entry)
    shipped = priced()
    assert shipped == priced(Calibration(entry["scale"], entry["kernel_overhead_s"]))
    # a file with another entry for h100x2 changes the default's price to that entry's
    path = tmp_path / "calibration.json"
    save_calibration("h100x2", Calibration(1.7, 7e-6, "test"), path)
    load = cost_model.load_calibration
    monkeypatch.setattr(cost_model, "load_calibration", lambda name: load(name, path))
    assert priced() == priced(Calibration(1.7, 7e-6)) != shipped


def test_calibration_constants_change_the_priced_time():
    cfg = get_preset("qwen3-30b-a3b")
    plan = make_plan(cfg, decode(cfg, 8) + [RowSlice(50, 0, (3,) * 512, 0, 48, False, 512)])

    def priced(calibration):
        return SimExecutor(cfg, "h100x2", seed=0, calibration=calibration).execute(plan)

    base = priced(CAL)
    # doubling the scale adds the roofline time once more; 1 µs more per kernel adds 1 µs x kernels
    assert priced(Calibration(2.0, 3e-6)).elapsed_s == pytest.approx(base.elapsed_s + base.extra["roofline_s"])
    assert priced(Calibration(1.0, 4e-6)).elapsed_s == pytest.approx(base.elapsed_s + 1e-6 * base.extra["kernels"])
