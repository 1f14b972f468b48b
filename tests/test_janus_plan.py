"""Janus's activation scheduler (against brute force), replica placement, the disaggregated cost model
and the SLO-aware planner (`moejax plan`). Shapes are fixed per test so that one compiled scheduler
serves every random case."""

import itertools
import json

import numpy as np
import pytest

from moejax.cli import main
from moejax.config import get_preset
from moejax.disagg.activation_scheduler import (assign_activations, check_replicas, instance_load,
                                                place_replicas, replica_table)
from moejax.disagg.planner import Planner
from moejax.meshes import SplitLayout
from moejax.sim.disagg import Deployment, DisaggCostModel
from moejax.sim.hardware import get_hardware
from moejax.sim.routing import make_routing

E, R, N = 7, 3, 4


def random_case(rng):
    replicas = np.full((E, R), -1)
    for e in range(E):
        k = rng.integers(1, R + 1)
        replicas[e, :k] = rng.choice(N, k, replace=False)
    tokens = rng.integers(1, 6, E) * (rng.random(E) < 0.8)
    return tokens, replicas


def brute_force_max_distinct(tokens, replicas):
    active = np.flatnonzero(tokens)
    best = E
    for choice in itertools.product(*[[r for r in replicas[e] if r >= 0] for e in active]):
        assign = np.full(E, -1)
        assign[active] = choice
        best = min(best, instance_load(assign, tokens, N)[0].max())
    return best


def test_scheduler_is_optimal_and_never_worse_than_token_balancing():
    rng = np.random.default_rng(0)
    cases = [random_case(rng) for _ in range(60)]
    tokens, replicas = np.stack([c[0] for c in cases]), np.stack([c[1] for c in cases])
    janus = np.asarray(assign_activations(tokens, replicas, N))  # [60, E]: every case at once
    token = np.asarray(assign_activations(tokens, replicas, N, policy="token"))
    for i in range(2):  # a batch of layers gives what each alone gives
        assert (janus[i] == np.asarray(assign_activations(tokens[i], replicas[i], N))).all()
        assert (token[i] == np.asarray(assign_activations(tokens[i], replicas[i], N, policy="token"))).all()
    strictly_better = 0
    for t, r, ours, theirs in zip(tokens, replicas, janus, token):
        for assign in (ours, theirs):
            assert (assign[t == 0] == -1).all()
            assert all(assign[e] in r for e in np.flatnonzero(t))
        ours, theirs = instance_load(ours, t, N)[0].max(), instance_load(theirs, t, N)[0].max()
        assert ours == brute_force_max_distinct(t, r)  # exact (augmenting paths)
        assert ours <= theirs
        strictly_better += ours < theirs
    assert strictly_better > 0  # the cases do tell the two policies apart


def test_tokens_break_ties():
    replicas = np.array([[0, 1, -1]] * E)  # every expert on instances 0 and 1
    tokens = np.array([8, 1, 1, 8, 0, 0, 0])
    assign = np.asarray(assign_activations(tokens, replicas, N))
    distinct, load = instance_load(assign, tokens, N)
    assert sorted(distinct.tolist()) == [0, 0, 2, 2] and load.max() == 9  # {8, 1} and {1, 8}, not {8, 8}


def test_replica_errors_name_the_fault():
    with pytest.raises(ValueError, match="expert 9"):
        replica_table([[0, 1], [2, 9]], num_experts=4)
    with pytest.raises(ValueError, match=r"experts \[3\] have no replica"):
        replica_table([[0, 1], [2]], num_experts=4)
    with pytest.raises(ValueError, match="instance 5"):
        check_replicas(np.array([[0], [5]]), num_experts=2, num_instances=2)
    with pytest.raises(ValueError, match="unknown activation policy 'fastest'"):
        assign_activations(np.ones(2), np.array([[0], [1]]), 2, policy="fastest")


def test_replica_placement_follows_load():
    load = np.array([10.0, 5, 1, 1, 1, 1, 1, 1])
    replicas = place_replicas(load, num_instances=4, slots_per_instance=3)  # 12 slots, 8 experts
    copies = (replicas >= 0).sum(1)
    assert (copies >= 1).all() and copies.sum() == 12
    assert copies[0] > copies[1] > copies[2]  # the hottest expert gets the most replicas
    per_instance = [(replicas == i).sum() for i in range(4)]
    assert max(per_instance) <= 3
    assert all(len(set(r[r >= 0])) == (r >= 0).sum() for r in replicas)  # one copy per instance
    with pytest.raises(ValueError, match="fewer than the model's 8"):
        place_replicas(load, num_instances=2, slots_per_instance=3)


@pytest.fixture(scope="module")
def cost_model():
    cfg = get_preset("qwen3-30b-a3b")
    return DisaggCostModel(cfg, get_hardware("h100"), make_routing("zipf", cfg, exponent=1.2), context_len=1024,
                           max_len=2048, sample_layers=4, draws=1)


def test_scheduler_lowers_modelled_moe_time(cost_model):
    def step(policy):
        return cost_model.step(Deployment("janus", 2, 4, 1, 64, policy), 256)

    janus, token = step("janus"), step("token")
    assert janus.max_distinct < token.max_distinct
    assert janus.moe_s < token.moe_s and janus.seconds < token.seconds


def test_planner_meets_the_slo_with_fewest_gpus_and_reports_infeasible(cost_model):
    planner = Planner(cost_model, slo_tpot=0.03, max_gpus=8, micro_batches=(1, 2))
    low, high = planner.plan(2, 256), planner.plan(40, 256)
    for p in (low, high):
        assert p.feasible and p.step.seconds <= 0.03 and p.tokens_s >= p.demand_tokens_s
    assert low.deployment.gpus < high.deployment.gpus
    for d, batches, steps in planner.curves("janus"):  # nothing smaller serves the low rate
        if d.gpus < low.deployment.gpus:
            assert not any(s.seconds <= 0.03 and b / s.seconds >= low.demand_tokens_s for b, s in zip(batches, steps))
    layout = low.layout()
    assert isinstance(layout, SplitLayout) and layout.num_devices == low.deployment.gpus
    placement = low.to_dict()["placement"]
    assert len(placement) == cost_model.cfg.num_moe_layers
    assert sorted(set().union(*map(set, placement[0]))) == list(range(cost_model.cfg.num_experts))

    too_fast = Planner(cost_model, slo_tpot=1e-4, max_gpus=8).plan(2, 256)
    assert not too_fast.feasible and "no deployment reaches TPOT" in too_fast.note
    too_many = planner.plan(1e6, 256)
    assert not too_many.feasible and "tokens/s needed" in too_many.note and too_many.step.seconds <= 0.03


def test_cli_plan_json(capsys):
    argv = ["plan", "--model", "qwen3-30b-a3b", "--hardware", "h100", "--slo-tpot", "0.03", "--max-gpus", "4",
            "--output-len", "256", "--routing", "zipf", "--json"]  # the compiled shapes of the tests above
    assert main([*argv, "--rate", "4"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["feasible"] and out["tpot_s"] <= 0.03 and out["gpus"] <= 4
    assert out["tokens_s"] >= 4 * 256 and out["layout"]["kind"] == "attention_expert"
    assert main([*argv, "--rate", "1e7"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert not out["feasible"] and out["note"].startswith("infeasible")
