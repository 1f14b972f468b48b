"""PrfaaS in simulation: the throughput model's choices checked by brute force, the table's models' KV
accounting, and the simulated per-request timeline (requests and bytes conserved, capacity reached)."""

import numpy as np
import pytest

from moejax.engine.kv_cache import kv_bytes
from moejax.engine.plan import RowSlice
from moejax.pd.throughput_model import NEVER, RequestProfile, capacity, choose_split, choose_threshold
from moejax.sim.hardware import Link, get_hardware
from moejax.sim.pd import (Deployment, _price, decode_plan, prefill_seconds, profile, run_deployment, simulate)
from moejax.sim.pd_models import PD_MODELS, get_pd_model
from moejax.sim.workloads import make_workload


def random_profile(seed: int, n: int = 150) -> RequestProfile:
    """Costs that grow with length, with noise, so no threshold is optimal by construction."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 3000, n)
    prfaas = lengths * rng.uniform(1e-4, 3e-4, n)
    local = lengths * rng.uniform(4e-4, 1e-3, n)
    kv = lengths * rng.uniform(1e3, 3e3, n)
    return RequestProfile(lengths, prfaas, local, kv, decode_rps=rng.uniform(5, 40))


@pytest.mark.parametrize("seed", range(4))
def test_chosen_threshold_maximises_capacity_over_every_integer_threshold(seed):
    prof = random_profile(seed)
    # scales where compute, link and local prefill all compete (a request: ~3 MB of KV, ~0.3 s / ~1 s prefill)
    split = dict(prfaas_instances=1 + seed % 2, prefill_instances=3, decode_instances=3,
                 link_bytes_per_s=float(np.random.default_rng(seed).uniform(3e6, 3e7)))
    chosen = choose_threshold(prof, **split)
    brute = [capacity(prof, t, **split).throughput for t in range(0, int(prof.prompt_len.max()) + 2)]
    assert chosen.throughput == pytest.approx(max(brute), rel=1e-12)
    assert capacity(prof, chosen.threshold, **split).throughput == pytest.approx(chosen.throughput, rel=1e-12)
    # offloading nothing is a candidate too
    assert chosen.throughput >= capacity(prof, NEVER, **split).throughput


def test_chosen_split_beats_every_split_and_threshold():
    prof = random_profile(7)
    chosen = choose_split(prof, prfaas_instances=2, local_instances=6, link_bytes_per_s=1e7)
    assert chosen.prefill_instances + chosen.decode_instances == 6
    thresholds = [*np.unique(prof.prompt_len), NEVER]
    brute = max(capacity(prof, t, prfaas_instances=2, prefill_instances=p, decode_instances=6 - p,
                         link_bytes_per_s=1e7).throughput for p in range(6) for t in thresholds)
    assert chosen.throughput == pytest.approx(brute, rel=1e-12)


def test_offload_share_falls_with_the_link_bandwidth():
    prof = random_profile(3, n=400)
    shares, egress = [], []
    for bw in np.geomspace(1e8, 1e4, 25):  # from a link that never binds down to one that nearly blocks
        c = choose_threshold(prof, prfaas_instances=4, prefill_instances=2, decode_instances=4, link_bytes_per_s=bw)
        shares.append(c.offload_share)
        egress.append(c.egress_bytes_per_s(prof) / bw)
    assert all(a >= b for a, b in zip(shares, shares[1:])), shares
    assert shares[0] > shares[-1]
    assert max(egress) <= 1 + 1e-9  # the chosen offload never needs more than the link carries


def test_profile_rejects_mismatched_arrays():
    with pytest.raises(ValueError, match="kv_bytes"):
        RequestProfile(np.arange(3), np.ones(3), np.ones(3), np.ones(2), decode_rps=1.0)
    with pytest.raises(ValueError, match="local_instances"):
        choose_split(random_profile(0), prfaas_instances=1, local_instances=0, link_bytes_per_s=1.0)
    with pytest.raises(ValueError, match="unknown PrfaaS model 'nope'"):
        get_pd_model("nope")


def test_model_kv_bytes_are_kv_cache_accounting_plus_fixed_state():
    for model in PD_MODELS.values():
        state = sum(p.state_bytes or 0 for p in model.parts)
        attn = [p.config for p in model.parts if p.state_bytes is None]
        for n in (1, 100, 129, 32768, 100_000):
            assert model.kv_bytes(n) == sum(kv_bytes(c, n) for c in attn) + state
        lengths = np.array([1, 129, 32768])
        assert list(model.kv_bytes(lengths)) == [model.kv_bytes(int(n)) for n in lengths]
    # past the windows only full-attention layers grow: MiMo's 8 full layers of 4 KV heads, K+V 192+128 wide
    mimo = get_pd_model("mimo-v2-flash")
    assert mimo.kv_bytes(20_000) - mimo.kv_bytes(10_000) == 10_000 * 8 * 4 * (192 + 128) * 2


def test_interpolated_prefill_time_matches_direct_pricing():
    model, hw = get_pd_model("qwen3.5-397b-a17b"), get_hardware("h200x8")
    lengths = np.random.default_rng(0).integers(100, 200_000, 6)
    direct = [_price(model, hw, [RowSlice(0, 0, (0,) * int(n), 0, 0, True, int(n))]) for n in lengths]
    np.testing.assert_allclose(prefill_seconds(model, hw, lengths), direct, rtol=0.01)
    with pytest.raises(ValueError, match="prompt lengths"):
        prefill_seconds(model, hw, [0])


def test_decode_plan_respects_its_limits():
    model, hw = get_pd_model("mimo-v2-flash"), get_hardware("h20x8")
    plan = decode_plan(model, hw, context=27_000, output_len=1024, tbt_target_s=0.05)
    free = hw.memory_bytes * 0.9 - model.weight_bytes()
    assert plan.batch * model.kv_bytes(28_024) <= free < (plan.batch + 1) * model.kv_bytes(28_024) \
        or plan.bound != "kv_memory"
    tight = decode_plan(model, hw, context=1000, output_len=64, tbt_target_s=plan.step_s * 0.9)
    assert tight.bound == "tbt" and tight.step_s <= plan.step_s * 0.9 < \
        decode_plan(model, hw, 1000, 64, 1.0, max_batch=tight.batch + 1).step_s
    with pytest.raises(ValueError, match="do not fit h20x8"):
        decode_plan(get_pd_model("ring-2.5-1t"), hw, 1000, 64, 0.05)


@pytest.fixture(scope="module")
def deployment():
    return Deployment(get_pd_model("mimo-v2-flash"), get_hardware("h200x8"), 2, get_hardware("h20x8"), 4,
                      Link("eth-10g", 1.25e9, 1e-3))  # 10 Gbps: the link matters


def test_simulated_timeline_conserves_requests_and_bytes(deployment):
    dep = deployment
    reqs = make_workload("longctx", 3.0, 300, seed=3)
    res = simulate(dep, reqs, threshold=30_000, prefill_instances=1, decode_instances=3)
    tl = res.requests
    assert sorted((r.arrival_s, r.prompt_len) for r in tl) == sorted((r.arrival_s, r.prompt_len) for r in reqs)
    off = [r for r in tl if r.route == "prfaas"]
    assert {r.route == "prfaas" for r in tl if r.prompt_len >= 30_000} <= {True}
    assert all(r.route == "local" for r in tl if r.prompt_len < 30_000)
    assert sum(r.kv_bytes for r in tl) == res.metrics["kv_bytes_shipped"] \
        == sum(dep.model.kv_bytes(r.prompt_len) for r in off)
    bw = dep.link.effective_bandwidth
    for r in tl:
        assert r.arrival_s <= r.prefill_start_s < r.prefill_end_s <= r.kv_ready_s <= r.decode_start_s < r.finish_s
    for r in off:
        assert r.transfer_s == pytest.approx(r.kv_bytes / bw)
        assert r.kv_ready_s >= r.prefill_start_s + r.transfer_s + dep.link.latency_s - 1e-9
    # the link carries one byte stream: by any time it has delivered at most bw × elapsed bytes
    ready = sorted((r.kv_ready_s - dep.link.latency_s, r.kv_bytes) for r in off)
    first = min(r.prefill_start_s for r in off)
    delivered = np.cumsum([b for _, b in ready])
    assert np.all(delivered <= bw * (np.array([t for t, _ in ready]) - first) * (1 + 1e-9))
    assert 0 < res.metrics["link_utilisation"] <= 1

    def most_at_once(spans):
        events = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans])
        return max(np.cumsum([e for _, e in events]))

    assert most_at_once([(r.prefill_start_s, r.prefill_end_s) for r in off]) <= dep.prfaas_instances
    assert most_at_once([(r.prefill_start_s, r.prefill_end_s) for r in tl if r.route == "local"]) <= 1
    _, decode = profile(dep, reqs)
    assert most_at_once([(r.decode_start_s, r.finish_s) for r in tl]) <= 3 * decode.batch


def test_simulation_saturates_at_the_modelled_capacity(deployment):
    """Offered twice the planned Λ, the event simulation completes requests at Λ (±10%): the model and
    the simulation agree on what binds."""
    out = run_deployment(deployment, num_requests=1200, load=2.0, seed=5)
    assert out["metrics"]["throughput_rps"] == pytest.approx(out["plan"]["throughput_rps"], rel=0.1)
    below = run_deployment(deployment, num_requests=600, load=0.5, seed=5)
    assert below["metrics"]["throughput_rps"] == pytest.approx(below["rate_rps"], rel=0.15)


def test_less_bandwidth_offloads_less_in_the_deployment(deployment):
    shares = [run_deployment(deployment.with_link_gbps(g), num_requests=300)["plan"]["offload_share"]
              for g in (100, 10, 1)]
    assert shares[0] >= shares[1] >= shares[2] and shares[0] > shares[2]
    with pytest.raises(ValueError, match="positive"):
        deployment.with_link_gbps(0)
    with pytest.raises(ValueError, match="prefill_instances=0"):
        simulate(deployment, make_workload("longctx", 1.0, 20), threshold=NEVER, prefill_instances=0, decode_instances=2)


def test_cli_writes_per_request_routes_bytes_and_link_use(tmp_path, capsys):
    import json

    from moejax.cli import main

    path = tmp_path / "prfaas.json"
    assert main(["prfaas", "--num-requests", "200", "--link-gbps", "25", "--json", str(path)]) == 0
    out = json.loads(path.read_text())
    reqs, plan, metrics = out["requests"], out["plan"], out["metrics"]
    assert len(reqs) == 200 and out["link_gbps"] == 25
    assert all((r["route"] == "prfaas") == (r["prompt_len"] >= plan["threshold"]) for r in reqs)
    assert sum(r["kv_bytes"] for r in reqs) == metrics["kv_bytes_shipped"] > 0
    assert metrics["link_utilisation"] == pytest.approx(
        sum(r["transfer_s"] for r in reqs) / metrics["makespan_s"])
    assert "capacity" in capsys.readouterr().out
    assert main(["prfaas", "--link-gbps", "0"]) == 2
    assert "link bandwidth must be positive" in capsys.readouterr().err
