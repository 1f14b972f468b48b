"""The load scheduler and the residency bookkeeping both offload executors share, and the simulator's
timeline: decisions checked on hand-made cases, the simulated stall against a hand count."""

import numpy as np
import pytest

from moejax.config import get_preset
from moejax.engine import build
from moejax.engine.plan import IterationPlan, LayerGroup, RowSlice
from moejax.offload.residency import Residency
from moejax.offload.schedule import Costs, LoadScheduler, Target
from moejax.sim.executor import SimExecutor


def costs(load_s=1.0, window=10.0, L=4, host_s=None):
    return Costs(load_s, np.full(L, window), host_s)


def target(layer, prob, candidates, victims):
    return Target(layer, np.asarray(prob, float), np.asarray(candidates), np.asarray(victims))


def test_presched_prefetches_only_what_fits_the_links_idle_window():
    prob = [0.9, 0.8, 0.7, 0.6, 0.05, 0.0]
    t = target(1, prob, [0, 1, 2, 3, 4], [-1, -1, -1, -1, -1])  # free slots
    d = LoadScheduler("presched").decide(0, np.array([]), np.array([], int), [t], costs(load_s=1.0, window=2.5))
    assert d.prefetch[1] == [(0, -1), (1, -1)]  # 2 loads fit 2.5 s; a third would delay layer 1's own loads
    d = LoadScheduler("greedy").decide(0, np.array([]), np.array([], int), [t], costs(load_s=1.0, window=2.5))
    assert [e for e, _ in d.prefetch[1]] == [0, 1, 2, 3]  # the baseline: every expert likelier needed than not
    # an occupied slot is taken only by a likelier expert than the one it holds
    t = target(1, [0.9, 0.8, 0.3, 0.2], [0, 1], [3, 2])
    d = LoadScheduler("presched").decide(0, np.array([]), np.array([], int), [t], costs(window=10))
    assert d.prefetch[1] == [(0, 3), (1, 2)]
    t = target(1, [0.9, 0.25, 0.3, 0.2], [0, 1], [3, 2])  # expert 1 (0.25) is less likely than 2 (0.3)
    assert LoadScheduler("presched").decide(0, np.array([]), np.array([], int), [t], costs()).prefetch[1] == [(0, 3)]


def test_presched_second_layer_gets_what_the_first_leaves():
    near = target(1, [0.9, 0.9, 0.5, 0.5], [0, 1, 2, 3], [-1, -1])  # 2 slots: 2 and 3 stay out (0.5 + 0.5 loads)
    far = target(2, [0.9, 0.8, 0.7, 0.0], [0, 1, 2], [-1, -1, -1])
    d = LoadScheduler("presched").decide(0, np.array([]), np.array([], int), [near, far],
                                         Costs(1.0, np.array([3.0, 2.0, 0.0, 0.0])))
    # window 3 s: 2 loads for layer 1; then 1 s left + layer 1's 2 s - its expected 1 s of misses = 2 loads
    assert d.prefetch[1] == [(0, -1), (1, -1)] and d.prefetch[2] == [(0, -1), (1, -1)]


def test_misses_split_between_link_and_host():
    tokens = np.array([1, 9, 2, 5])
    misses = np.array([10, 11, 12, 13])
    host_s = lambda n: 0.5 * np.asarray(n, float)  # noqa: E731
    c = costs(load_s=2.0, host_s=host_s)
    d = LoadScheduler("presched", host_compute=True).decide(0, tokens, misses, [], c)
    # busiest first: 9, 5, 2, 1 tokens; loading k of them vs the rest on the host: k=2 -> max(4, 1.5) = 4,
    # k=1 -> max(2, 4) = 4: equal, the device side is preferred
    assert d.load.tolist() == [11, 13] and sorted(d.host.tolist()) == [10, 12]
    d = LoadScheduler("greedy", host_compute=True).decide(0, tokens, misses, [], c)
    assert sorted(d.load.tolist()) == [11, 13] and sorted(d.host.tolist()) == [10, 12]  # each alone: 0.5 n < 2
    d = LoadScheduler("presched").decide(0, tokens, misses, [], c)  # no host compute: everything loads
    assert d.load.tolist() == [11, 13, 12, 10] and d.host.size == 0


def test_residency_places_evicts_pins_and_counts():
    r = Residency((True, True), num_experts=6, num_slots=3, expert_bytes=100.0, scheduler=LoadScheduler("presched"))
    c = costs(window=10.0, L=2)
    loads = r.layer_pass(0, np.array([2, 1, 0, 0, 0, 0]), {1: np.array([0.9, 0, 0, 0, 0.8, 0.7])}, c)
    assert loads.cached == [(0, 0), (1, 1)] and loads.transient == []
    assert [(m, e) for m, e, _ in loads.prefetch] == [(1, 0), (1, 4), (1, 5)]
    # layer 1 needs 0, 1, 2, 3: 0 was prefetched (a hit), 4 and 5 were not needed; 3 slots for 4 experts
    loads = r.layer_pass(1, np.array([1, 1, 1, 1, 0, 0]), {}, c)
    assert sorted(e for e, _ in loads.cached) == [1, 2] and loads.transient == [3]
    assert r.cached(1)[[0, 1, 2]].all() and not r.cached(1)[[3, 4, 5]].any()
    s = r.stats.summary()
    assert s["hit_rate"] == 1 / 6  # layer 0: 0 of 2, layer 1: 1 of 4
    assert s["prefetch_precision"] == 1 / 3 and s["prefetch_recall"] == 1 / 6  # 1 of 3 used; 6 needed uncached
    assert s["bytes_h2d"] == 100.0 * (2 + 3 + 3) and s["loads_transient"] == 1
    # a prefetched expert is never evicted before the pass it was loaded for
    loads = r.layer_pass(0, np.array([1, 0, 0, 0, 0, 0]), {1: np.array([0, 0, 0, 0.9, 0.9, 0.9])}, c)
    assert sorted(e for _, e, _ in loads.prefetch) == [3, 4, 5]  # replacing 0, 1, 2 (now unlikely)
    loads = r.layer_pass(0, np.array([0, 0, 0, 0, 0, 1]), {1: np.array([0.95, 0.95, 0.95, 0.0, 0.0, 0.0])}, c)
    assert loads.prefetch == [] and r.prefetched[1][[3, 4, 5]].all()


def decode_plan(num_layers, requests=3):
    slices = tuple(RowSlice(i, 5, (7,), 0, num_layers, True, 6) for i in range(requests))
    return IterationPlan(0, slices, (LayerGroup(0, num_layers, tuple(range(requests))),),
                         {i: (i,) for i in range(requests)}, (), num_layers=num_layers)


def test_simulated_stall_is_the_on_demand_loads_on_the_host_link():
    """An empty cache, no predictor: every expert a layer needs is loaded on demand when its routing is
    known, so the iteration takes the plain simulator's time plus one load per distinct expert."""
    cfg = get_preset("qwen3-30b-a3b")
    plan = decode_plan(cfg.num_layers)
    offload = build(cfg, "sim-offload", hardware="a100", host_link="pcie3", device_expert_slots=cfg.num_experts,
                    predictor="none", max_num_seqs=8, max_model_len=64).executor
    plain = SimExecutor(cfg, "a100", routing="correlated", seed=0)
    expert_bytes = 3 * 2048 * 768 * 2  # gate, up, down of one bf16 expert
    load_s = 1e-5 + expert_bytes / (15.75e9 * 0.8)  # PCIe 3 x16 at 80%, plus its latency
    assert offload.load_s == pytest.approx(load_s)
    seen = np.zeros((cfg.num_layers, cfg.num_experts), bool)
    for _ in range(2):  # the second time, only experts the first did not bring are loaded
        got, want = offload.execute(plan), plain.execute(plan)
        drawn = want.layer_stats.expert_tokens > 0  # the same draw: same seed, same plan
        new = (drawn & ~seen).sum()
        seen |= drawn
        assert got.elapsed_s - want.elapsed_s == pytest.approx(new * load_s, rel=1e-9)
        assert got.extra["offload_stall_s"] == pytest.approx(new * load_s, rel=1e-9)
        assert got.extra["offload_bytes_h2d"] == new * expert_bytes
    assert 0 < new < drawn.sum()


def test_sim_offload_bad_settings_are_named():
    with pytest.raises(ValueError, match="dense"):
        build("qwen3-8b", "sim-offload", hardware="h100", max_model_len=64)
    with pytest.raises(ValueError, match=r"device_expert_slots=4: fewer slots than the 8 experts"):
        build("qwen3-30b-a3b", "sim-offload", hardware="h100", device_expert_slots=4, max_model_len=64)
    with pytest.raises(ValueError, match="offload_experts=1.0"):
        build("qwen3-30b-a3b", "sim-offload", hardware="h100", offload_experts=1.0, max_model_len=64)
    with pytest.raises(ValueError, match="not both"):
        build("qwen3-30b-a3b", "sim-offload", hardware="h100", offload_experts=0.5, device_expert_slots=64)
    with pytest.raises(ValueError, match="unknown predictor 'oracle'"):
        build("qwen3-30b-a3b", "sim-offload", hardware="h100", predictor="oracle", max_model_len=64)


def test_cli_simulate_with_offload_and_a_bad_setting(tmp_path, capsys):
    """The offload options reach the simulated run (its JSON has the offload metrics and settings);
    a bad one is a clear error naming the setting."""
    import json

    from moejax.cli import main

    out = tmp_path / "s.json"
    assert main(["simulate", "--model", "tiny-qwen3-moe", "--hardware", "a100", "--device-expert-slots", "5",
                 "--predictor", "lfru", "--host-link", "pcie3", "--num-requests", "3", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    offload = result["offload"]
    assert (offload["slots"], offload["predictor"], offload["host_link"]) == (5, "lfru", "pcie3")
    assert result["metrics"]["offload_bytes_h2d"] == offload["bytes_h2d"] > 0
    assert 0 < result["metrics"]["offload_hit_rate"] < 1
    capsys.readouterr()
    assert main(["generate", "--max-tokens", "2", "--device-expert-slots", "2"]) == 2
    assert "device_expert_slots=2: fewer slots than the 4 experts" in capsys.readouterr().err
