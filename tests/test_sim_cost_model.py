"""Hardware presets, the roofline cost model against hand arithmetic, energy, calibration fitting,
and the vectorised traffic accounting against a per-row brute force."""

import numpy as np
import pytest

from moejax.config import get_preset
from moejax.engine import traffic
from moejax.engine.plan import IterationPlan, RowSlice, StepResult, layer_groups
from moejax.sim.cost_model import (CALIBRATION_PATH, Calibration, CostModel, fit_calibration,
                                   idle_energy_j, load_calibration, save_calibration)
from moejax.sim.executor import SimExecutor
from moejax.sim.hardware import HARDWARE, get_hardware
from moejax.sim.routing import UniformRouting, plan_expert_tokens

NO_OVERHEAD = Calibration(scale=1.0, kernel_overhead_s=0.0)


def make_plan(cfg, slices):
    return IterationPlan(0, tuple(slices), layer_groups(slices, cfg.num_layers), {}, (),
                         num_layers=cfg.num_layers)


def decode_rows(cfg, count, position, first_id=0):
    L = cfg.num_layers
    return [RowSlice(first_id + i, position, (1,), 0, L, True, position + 1) for i in range(count)]


def price(cfg, hw, plan, calibration=NO_OVERHEAD, expert_tokens=None):
    stats = traffic.layer_stats(cfg, plan, expert_tokens=expert_tokens)
    return CostModel(cfg, get_hardware(hw), calibration).price(plan, stats)


def test_hardware_presets_and_errors():
    h = get_hardware("h100x2")
    assert h.count == 2 and h.interconnect.name == "nvlink4" and h.host_link.name == "pcie5"
    assert h.memory_bytes == 160e9
    assert get_hardware("l40sx2").interconnect.name == "pcie4"  # no NVLink on L40S
    assert get_hardware("a100").with_host_link("pcie3").host_link.bandwidth == 15.75e9
    assert {"h100", "h100x2", "h100x8", "h200", "a100x2", "l40s"} <= set(HARDWARE)
    with pytest.raises(ValueError, match="unknown hardware 'h900'.*h100x2"):
        get_hardware("h900")
    with pytest.raises(ValueError, match="unknown link 'pcie9'"):
        get_hardware("h100").with_host_link("pcie9")


def test_dense_decode_matches_hand_roofline():
    """Qwen3-8B, 64 decode rows at position 1023 on one H100: bytes and FLOPs counted by hand; the
    iteration is memory-bound (compute and power roofs far below), so it takes bytes / (3.35 TB/s · 0.8)
    plus 3 µs per kernel, and its energy is 64 pJ per byte + (700 − 105) W / (70% of 989.4 TFLOPS) per
    FLOP + 105 W static."""
    cfg = get_preset("qwen3-8b")
    plan = make_plan(cfg, decode_rows(cfg, 64, 1023))
    D, q, kv, F, V, L, rows = 4096, 32 * 128, 8 * 128, 12288, 151936, 36, 64
    attn_params = 2 * D * q + 2 * D * kv + 2 * D  # q, o, k, v + two norms
    mlp_params = 3 * D * F
    kv_read = rows * 1024 * (2 * kv) * 2  # every row attends 1024 keys of K and V
    kv_write = rows * (2 * kv) * 2
    attn_act = rows * (4 * D + (D + q + 2 * kv) + 2 * q + (q + D)) * 2  # norms, qkv, attention, o
    mlp_act = rows * (4 * D + (D + 2 * F) + 3 * F + (F + D)) * 2  # norms, gate_up, act, down
    layer_bytes = (attn_params + mlp_params) * 2 + kv_read + kv_write + attn_act + mlp_act  # bf16
    head_bytes = 2 * rows * D * 2 + V * D * 2 + rows * V * 2  # embedding rows, lm head, logits
    nbytes = L * layer_bytes + head_bytes
    # 2 FLOPs per parameter per row; scores and values: 2 x 2 FLOPs per key per query dimension
    flops = L * (2 * rows * (attn_params + mlp_params) + 4 * rows * 1024 * q) + 2 * rows * V * D
    kernels = L * (7 + 4) + 1 + 4  # attention + dense MLP per layer; embedding; head
    seconds = nbytes / (3.35e12 * 0.8) + kernels * 3e-6

    cal = Calibration(scale=1.0, kernel_overhead_s=3e-6)
    result = SimExecutor(cfg, "h100", seed=0, calibration=cal).execute(plan)
    cost = price(cfg, "h100", plan, calibration=cal)
    assert cost.hbm_bytes == pytest.approx(nbytes, rel=1e-12)
    assert cost.flops == pytest.approx(flops, rel=1e-12)
    assert result.extra["kernels"] == cost.kernels == kernels
    assert result.elapsed_s == cost.seconds == pytest.approx(seconds, rel=1e-9)
    pj_per_flop = (700 - 105) / (0.7 * 989.4e12) * 1e12
    assert result.energy_j == pytest.approx(1e-12 * (pj_per_flop * flops + 64 * nbytes) + 105 * seconds, rel=1e-9)
    assert set(result.sampled) == set(range(rows))


def test_tensor_parallel_halves_weight_time_and_adds_all_reduce():
    """Batch-1 decode of Qwen3-8B (weight-bound): TP=2 halves the roofline time; communication is two
    all-reduces of one hidden row per layer, the embedding all-reduce and the logits all-gather."""
    cfg = get_preset("qwen3-8b")
    plan = make_plan(cfg, decode_rows(cfg, 1, 0))
    one, two = price(cfg, "h100", plan), price(cfg, "h100x2", plan)
    assert one.comm_s == 0.0
    # replicated hidden-row activations make TP=2 slightly more than half
    assert two.roofline_s == pytest.approx(one.roofline_s / 2, rel=2e-3)
    assert two.roofline_s > one.roofline_s / 2
    latency, bw = 5e-6, 450e9 * 0.8  # NVLink 4, per direction, at 80%
    row = 4096 * 2
    all_reduce = latency + 2 * (2 - 1) / 2 * row / bw
    gather_logits = latency + (2 - 1) / 2 * 151936 * 2 / bw
    assert two.comm_s == pytest.approx(36 * 2 * all_reduce + all_reduce + gather_logits, rel=1e-9)
    assert two.kernels == one.kernels


def test_expert_bytes_follow_distinct_experts():
    """Qwen3-30B-A3B decode, memory-bound: every extra activated expert adds its weights / bandwidth."""
    cfg = get_preset("qwen3-30b-a3b")
    plan = make_plan(cfg, decode_rows(cfg, 16, 100))
    E, L = cfg.num_experts, cfg.num_layers
    few, many = np.zeros((L, E), np.int64), np.zeros((L, E), np.int64)
    few[:, :8], many[:, :64] = 2, 1
    t_few = price(cfg, "h100", plan, expert_tokens=few).roofline_s
    t_many = price(cfg, "h100", plan, expert_tokens=many).roofline_s
    expert_bytes = 3 * 2048 * 768 * 2
    assert t_many - t_few == pytest.approx(L * 56 * expert_bytes / (3.35e12 * 0.8), rel=1e-6)


@pytest.mark.parametrize("hw_name", ["h100x2", "h200", "a100x2", "l40s"])
def test_power_is_between_static_and_tdp(hw_name):
    cfg = get_preset("qwen3-30b-a3b")
    hw = get_hardware(hw_name)
    dev = hw.device
    rng = np.random.default_rng(0)
    decode = make_plan(cfg, decode_rows(cfg, 64, 2000))
    prefill = make_plan(cfg, [RowSlice(0, 0, (1,) * 8192, 0, cfg.num_layers, True, 8192)])
    for plan in (decode, prefill):
        stats = traffic.layer_stats(cfg, plan, plan_expert_tokens(cfg, plan, UniformRouting(48, 128, 8), rng))
        c = CostModel(cfg, hw, Calibration()).price(plan, stats)
        # between static power and the TDP on each device: the power roof caps compute-bound prefill
        watts = c.energy_j / c.seconds / hw.count
        assert dev.static_w < watts <= dev.tdp_w, watts


def test_idle_energy_is_static_power_of_every_device():
    assert idle_energy_j(get_hardware("h100x2"), 2.0) == pytest.approx(2 * 105 * 2.0)  # 15% of 700 W each


def test_pj_per_flop_spends_the_tdp_at_sustained_gemm_throughput():
    dev = get_hardware("h100").device
    assert dev.pj_per_flop == pytest.approx((700 - 105) / (0.7 * 989.4e12) * 1e12)  # ≈ 0.86 pJ


def _measured_samples(cfg, hw, truth, rng, noise=0.0):
    routing = UniformRouting(cfg.num_layers, cfg.num_experts, cfg.num_experts_per_tok)
    model = CostModel(cfg, hw, truth)
    samples = []
    for batch, prompt in [(1, 0), (8, 0), (64, 0), (4, 512), (16, 2048), (128, 0), (2, 8192)]:
        slices = decode_rows(cfg, batch, 500, first_id=100)
        if prompt:
            slices.append(RowSlice(0, 0, (1,) * prompt, 0, cfg.num_layers, True, prompt))
        plan = make_plan(cfg, slices)
        stats = traffic.layer_stats(cfg, plan, plan_expert_tokens(cfg, plan, routing, rng))
        seconds = model.price(plan, stats).seconds * (1 + noise * rng.standard_normal())
        samples.append((plan, StepResult({}, seconds, stats.total_expert_bytes, stats=stats)))
    return samples


def test_calibration_fit_recovers_planted_constants(tmp_path):
    cfg, hw = get_preset("qwen3-30b-a3b"), get_hardware("h100x2")
    truth = Calibration(scale=1.37, kernel_overhead_s=4.2e-6)
    rng = np.random.default_rng(0)
    start = CostModel(cfg, hw, Calibration())
    fit = fit_calibration(start, _measured_samples(cfg, hw, truth, rng))
    assert fit.scale == pytest.approx(1.37, rel=1e-6)
    assert fit.kernel_overhead_s == pytest.approx(4.2e-6, rel=1e-6)
    noisy = fit_calibration(start, _measured_samples(cfg, hw, truth, rng, noise=0.02))
    assert noisy.scale == pytest.approx(1.37, rel=0.05)
    assert noisy.kernel_overhead_s == pytest.approx(4.2e-6, rel=0.25)
    # scale alone, overhead kept at the cost model's
    only_scale = fit_calibration(CostModel(cfg, hw, Calibration(1.0, 4.2e-6)),
                                 _measured_samples(cfg, hw, truth, rng), fit_overhead=False)
    assert only_scale.scale == pytest.approx(1.37, rel=1e-6) and only_scale.kernel_overhead_s == 4.2e-6
    # one plan shape cannot separate the two constants
    sample = _measured_samples(cfg, hw, truth, rng)[2]
    with pytest.raises(ValueError, match="do not separate"):
        plan, result = sample
        fit_calibration(start, [sample, (plan, StepResult({}, result.elapsed_s * 1.01, 0.0, stats=result.layer_stats))])

    # written back and loaded by hardware name; other names fall back to "default"
    path = tmp_path / "calibration.json"
    path.write_text(CALIBRATION_PATH.read_text())
    save_calibration("h100x2", fit, path)
    assert load_calibration("h100x2", path) == fit
    assert load_calibration("a100", path) == load_calibration("anything", path)
    assert load_calibration("a100", path).source.startswith("uncalibrated")


def test_calibration_file_round_trip_and_malformed_entries(tmp_path):
    path = tmp_path / "calibration.json"
    a, b, c = Calibration(1.37, 4.2e-6, "fit a"), Calibration(0.8, 0.0, "fit b"), Calibration(2.5, 1e-5, "fit c")
    save_calibration("h100x2", a, path)  # a new file starts with the built-in default
    save_calibration("h200", b, path)
    save_calibration("h100x2", c, path)  # replaces h100x2, keeps h200
    assert load_calibration("h100x2", path) == c
    assert load_calibration("h200", path) == b
    assert load_calibration("l40s", path) == Calibration()
    # a misspelt field is an error, not a silent fallback to the defaults
    path.write_text('{"default": {"scale": 1.0, "kernel_overhead_s": 3e-6}, "h100": {"scale": 1.2, "overhead_s": 1}}')
    with pytest.raises(TypeError, match="overhead_s"):
        load_calibration("h100", path)
    path.write_text('{"h100": {"scale": 1.2}}')  # no "default" entry for other hardware
    with pytest.raises(KeyError, match="default"):
        load_calibration("a100", path)


def _brute_force_work(cfg, plan):
    """Row by row: each row at position p attends keys max(0, p-w+1) .. p of its layer."""
    L = cfg.num_layers
    tokens, attended, read = np.zeros(L, np.int64), np.zeros(L, np.int64), np.zeros(L, np.int64)
    for s in plan.slices:
        for layer in range(s.layer_start, s.layer_end):
            w = cfg.sliding_windows[layer]
            keys = set()
            for p in range(s.start, s.start + s.num_tokens):
                row_keys = range(0 if w is None else max(0, p - w + 1), p + 1)
                attended[layer] += len(row_keys)
                keys.update(row_keys)
            tokens[layer] += s.num_tokens
            read[layer] += len(keys)
    return tokens, attended, read


@pytest.mark.parametrize("name", ["gpt-oss-20b", "tiny-qwen3-moe"])
def test_vectorised_layer_work_matches_brute_force(name):
    cfg = get_preset(name)  # windows shrunk to 48 so that short slices straddle them
    cfg = cfg.replace(sliding_windows=tuple(48 if i % 2 else None for i in range(cfg.num_layers)))
    rng = np.random.default_rng(0)
    for _ in range(20):
        slices = []
        for i in range(int(rng.integers(1, 6))):
            a = int(rng.integers(0, cfg.num_layers))
            b = int(rng.integers(a + 1, cfg.num_layers + 1))
            start, n = int(rng.integers(0, 120)), int(rng.integers(1, 90))
            slices.append(RowSlice(i, start, (1,) * n, a, b, False, start + n))
        plan = make_plan(cfg, slices)
        work = traffic.layer_work(cfg, plan)
        tokens, attended, read = _brute_force_work(cfg, plan)
        np.testing.assert_array_equal(work.tokens, tokens)
        np.testing.assert_array_equal(work.attended_keys, attended)
        np.testing.assert_array_equal(work.keys_read, read)
