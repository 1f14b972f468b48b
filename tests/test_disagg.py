"""Attention and routed experts on disjoint device pools (moejax.disagg, 8 CPU devices): greedy outputs
equal the colocated executor's for every split, policy, micro-batch count and exchange form; the
exchange's plans deliver every row and the two forms send what they claim; micro-batches take each
request whole; the pools' busy time comes from dispatch / ready times; bad layouts and options are
clear errors. Expert replicas: greedy outputs unchanged under either activation policy, the slot map
runs every activated expert on the replica the scheduler chose, the janus policy balances distinct
experts per instance better than token balancing on the trained checkpoint's routing, bad replica
tables are clear errors."""

import json

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from moejax import LLM
from moejax.checkpoint import load_model
from moejax.config import PRESETS
from moejax.disagg.activation_scheduler import assign_activations, instance_load
from moejax.disagg.exchange import Exchange, host_map, plan, seconds, traffic_of
from moejax.disagg.microbatch import choose_micro_batches, split_rows
from moejax.disagg.timeline import busy
from moejax.engine import build
from moejax.engine.sampling import SamplingParams
from moejax.runs import run
from moejax.meshes import LayoutError
from moejax.sim.hardware import LINKS

ARCH = "tiny-qwen3-moe"
GREEDY = SamplingParams(max_tokens=5, ignore_eos=True)
PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9], [(11 * i + 3) % 500 for i in range(23)], [5] * 12, [42]]
SIZES = dict(max_model_len=64, block_size=4, num_blocks=96)
# every other architecture: two requests (one per micro-batch), a prefill and two decode steps -- few
# row shapes to compile, every piece of the layer still crossing the pools
FEW = (PROMPTS[:2], SamplingParams(max_tokens=3, ignore_eos=True))


def generate(model, executor, requests=(PROMPTS, GREEDY), **options):
    engine = build(model, executor, **SIZES, **options)
    prompts, params = requests
    reqs = [engine.add_request(p, params) for p in prompts]
    while engine.has_unfinished:
        engine.step()
    return [r.output_token_ids for r in reqs], engine


_cache: dict = {}


def colocated(arch: str, requests=(PROMPTS, GREEDY)):
    """The reference: the jax executor on one device, layer by layer."""
    key = (arch, requests is FEW)
    if key not in _cache:
        _cache[key] = generate(load_model(arch, seed=3)[0], "jax", requests, fuse=False)[0]
    return _cache[key]


def split_model(arch: str, layout: str):
    key = (arch, layout)
    if key not in _cache:
        _cache[key] = load_model(arch, seed=3, layout=layout)[0]
    return _cache[key]


@pytest.mark.parametrize("policy, m, form", [
    ("chunked@8", 1, "direct"),      # prompts chunked, mixed with decodes
    ("chunked@8", 2, "two_phase"),   # two micro-batches ping-pong; rows cross by host pairs
    pytest.param("layered", 2, "direct", marks=pytest.mark.slow),  # layer groups, hidden rows kept between iterations
])
def test_greedy_equals_colocated_4_4(policy, m, form):
    got, engine = generate(split_model(ARCH, "cpu8-attn4-exp4"), "disagg", policy=policy, micro_batches=m,
                           exchange=form, emulated_hosts=2)
    assert got == colocated(ARCH)
    steps = [s for s in engine.steps if s.num_tokens]
    assert steps


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["cpu8-attn2-exp6", "cpu8-attn6-exp2"])
def test_greedy_equals_colocated_other_splits(layout):
    model = split_model(ARCH, layout)
    assert len({d.id for d in model.placements.attention.mesh.devices.flat}) == int(layout.split("-")[1][4:])
    got, _ = generate(model, "disagg", micro_batches=2)
    assert got == colocated(ARCH)


# the tiny presets of every other architecture (not tiny-moe-64x4: Qwen3-MoE again, only larger)
OTHER_ARCHITECTURES = sorted(n for n, c in PRESETS.items()
                             if n.startswith("tiny-") and c.architecture != PRESETS[ARCH].architecture)


@pytest.mark.slow
@pytest.mark.parametrize("arch", OTHER_ARCHITECTURES)
def test_greedy_equals_colocated_every_architecture(arch):
    got, _ = generate(split_model(arch, "cpu8-attn4-exp4"), "disagg", FEW, micro_batches=2)
    assert got == colocated(arch, FEW)


@pytest.mark.parametrize("activation_policy, m", [("janus", 1), ("token", 2)])
def test_greedy_equals_colocated_with_replicas(activation_policy, m):
    """6 slots per instance (16 experts, 4 instances): 8 experts have a second replica, placed by load
    per layer; whichever replica the scheduler picks, the tokens are the colocated ones."""
    load = np.random.default_rng(0).random((4, 16))  # per MoE layer: a different placement each
    got, engine = generate(split_model(ARCH, "cpu8-attn4-exp4"), "disagg", micro_batches=m, replicas="auto",
                           expert_slots=6, expert_load=load, activation_policy=activation_policy)
    assert engine.executor.replicas.replicated
    assert got == colocated(ARCH)


def test_slot_map_runs_each_expert_on_its_chosen_replica():
    """For random routed ids: every activated expert's slot lies on the instance the reference
    scheduler (assign_activations) picks and holds that expert's weights; distinct experts and tokens
    per instance are the reference's."""
    model = split_model(ARCH, "cpu8-attn4-exp4")
    held = [[0, 1, 2, 3, 4, 5], [4, 5, 6, 7, 8, 9], [8, 9, 10, 11, 12, 13], [12, 13, 14, 15, 0, 1]]
    engine = build(model, "disagg", **SIZES, replicas=held)
    replicas = engine.executor.replicas
    rng = np.random.default_rng(1)
    for _ in range(3):
        ids = rng.integers(0, 16, (8, 4)).astype(np.int32)
        ids[rng.random(8) < 0.25] = 16  # padding rows reach no expert
        buffer, slot_of, tokens, distinct, load = (np.asarray(a) if not isinstance(a, tuple) else a
                                                   for a in replicas.schedule(0, jax.numpy.asarray(ids)))
        want_tokens = np.bincount(ids[ids < 16], minlength=16)
        want = np.asarray(assign_activations(want_tokens, engine.executor.replicas.layers[0][1], 4))
        np.testing.assert_array_equal(tokens, want_tokens)
        np.testing.assert_array_equal(slot_of // 6, np.where(want >= 0, want, -1))
        w_gate_up = np.asarray(buffer[0])
        for e in np.flatnonzero(want_tokens):
            assert e in held[slot_of[e] // 6]
            np.testing.assert_array_equal(w_gate_up[slot_of[e]], np.asarray(model.expert_weights(0)[0][e]))
        assert (slot_of[want_tokens == 0] == -1).all()
        ref_distinct, ref_load = instance_load(want, want_tokens, 4)
        np.testing.assert_array_equal(distinct, ref_distinct)
        np.testing.assert_array_equal(load, ref_load)


def test_janus_balances_distinct_experts_better_than_tokens_on_stdlib_moe():
    """The trained checkpoint's real routing, 10 slots per instance (32 experts, 4 instances), janus
    policy: each step's reported per-instance balance is the reference scheduler's on that step's
    routed tokens, and on the same routing token balancing puts more distinct activated experts on
    the busiest instance. (Two runs would not route alike: a different replica choice sums the
    experts' outputs in another order, and bf16 router near-ties flip.)"""
    model, tok = load_model("stdlib-moe", layout="cpu8-attn4-exp4")
    engine = build(model, "disagg", max_model_len=64, block_size=8, num_blocks=64, micro_batches=1,
                   replicas="auto", expert_slots=10, activation_policy="janus")
    for s in ("import os\n", "def main():\n", "class Foo(object):\n    def", "for i in range("):
        engine.add_request(list(tok.encode(s).ids), SamplingParams(max_tokens=6, ignore_eos=True))
    tables = {i: np.asarray(r) for i, (_, r, _) in engine.executor.replicas.layers.items()}
    busiest = {"janus": [], "token": []}
    while engine.has_unfinished:
        result = engine.step().result
        tokens = result.layer_stats.expert_tokens
        for policy, out in busiest.items():
            distinct = [instance_load(assign_activations(tokens[i], table, 4, policy), tokens[i], 4)[0].max()
                        for i, table in tables.items()]
            out.append(np.mean(distinct))
        assert result.extra["distinct_experts_max"] == pytest.approx(busiest["janus"][-1])
    assert engine.executor.disagg_summary()["distinct_experts_max"] == pytest.approx(np.mean(busiest["janus"]))
    assert np.mean(busiest["janus"]) < np.mean(busiest["token"])
    assert all(j <= t for j, t in zip(busiest["janus"], busiest["token"]))


def test_run_json_carries_the_instance_balance():
    """moejax.runs.run on a split layout: the disagg object of the run JSON has the per-instance balance
    of the timed run's steps (max >= mean, the mean tokens per instance = routed tokens / instances)."""
    result = run(ARCH, layout="cpu8-attn4-exp4", policy="chunked@8", num_requests=3, rate=100.0, warmup=False,
                 seed=3, **SIZES, replicas="auto", expert_slots=6, activation_policy="janus", micro_batches=1)
    d = result["disagg"]
    assert (d["moe_instances"], d["expert_slots"], d["activation_policy"]) == (4, 6, "janus")
    assert d["steps"] > 0 and d["exchange_bytes_per_step"] > 0
    assert 1 <= d["distinct_experts_mean"] <= d["distinct_experts_max"] <= 6
    assert d["instance_tokens_mean"] <= d["instance_tokens_max"]
    assert 0 < d["attention_busy"] <= 1 and 0 < d["expert_busy"] <= 1
    json.dumps(result)


def test_step_metrics_count_the_exchange_and_the_pools():
    """Per step: bytes and messages as the chosen form's plans say (a prefill of many rows sends more
    bytes than a decode step), busy fractions within [0, 1] measured on the timeline."""
    model = split_model(ARCH, "cpu8-attn4-exp4")
    engine = build(model, "disagg", **SIZES, micro_batches=1, exchange="direct", emulated_hosts=2)
    for p in PROMPTS[2:4]:
        engine.add_request(p, GREEDY)
    outs = []
    while engine.has_unfinished:
        outs.append(engine.step().result.extra)
    prefill, decode = outs[0], outs[-1]
    assert prefill["exchange_bytes"] > decode["exchange_bytes"] > 0
    moe_layers = sum(model.config.moe_layers)
    # direct: 4 attention shards -> 4 expert devices (y, ids, weights) and one message back per shard
    assert decode["exchange_messages"] == moe_layers * (3 * 4 * 4 + 4)
    assert 0 < decode["exchange_cross_host_messages"] < decode["exchange_messages"]
    for extra in (prefill, decode):
        assert 0 < extra["attention_busy"] <= 1 and 0 < extra["expert_busy"] <= 1
        assert 0 <= extra["pool_overlap"] <= min(extra["attention_busy"], extra["expert_busy"])
    summary = engine.executor.disagg_summary()  # what a run's JSON carries
    assert summary["steps"] == len(outs)
    assert summary["exchange_bytes"] == sum(o["exchange_bytes"] for o in outs)
    assert summary["exchange_messages_per_step"] == sum(o["exchange_messages"] for o in outs) / len(outs)


def _exchange_rows(T=16, D=6):
    devices = jax.devices()
    attention = jax.sharding.Mesh(np.array(devices[:4]), ("data",))
    experts = jax.sharding.Mesh(np.array(devices[4:]), ("expert",))
    x = np.random.default_rng(1).standard_normal((T, D)).astype(np.float32)
    return x, NamedSharding(attention, PartitionSpec("data")), NamedSharding(experts, PartitionSpec())


@pytest.mark.parametrize("hosts", [1, 2, 4])
def test_exchange_forms_deliver_identical_rows(hosts):
    x, rows_split, replicated = _exchange_rows()
    devices = jax.devices()
    exchange = Exchange(host_map({"attention": devices[:4], "experts": devices[4:]}, hosts))
    there = {}
    for pool_moves in (True, False):  # one device_put per array, or the form's point-to-point messages
        exchange.pool_moves = pool_moves
        there |= {(f, pool_moves): exchange.move(jax.device_put(x, rows_split), replicated, f)
                  for f in ("direct", "two_phase")}
    for (form, pool_moves), a in there.items():
        exchange.pool_moves = pool_moves
        assert a.sharding == replicated
        for shard in a.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), x, err_msg=form)
        back = exchange.move(a, rows_split, form)
        for shard in back.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), x[shard.index], err_msg=form)
    # the multi-process path (one resharding program over both pools' devices) delivers the same
    union = exchange._union_move(jax.device_put(x, rows_split), replicated)
    assert all(np.array_equal(np.asarray(s.data), x) for s in union.addressable_shards)
    back = exchange._union_move(union, rows_split)
    assert all(np.array_equal(np.asarray(s.data), x[s.index]) for s in back.addressable_shards)


def test_two_phase_crosses_hosts_once_per_host_pair():
    """4 attention shards -> 4 expert devices, 2 hosts per pool (host k: attention group k, expert
    group k): direct sends 16 messages, 8 of them between hosts; two-phase one message per
    (source host, destination host) pair plus the gathers and scatters inside hosts."""
    src = {a: (4 * a, 4 * a + 4) for a in range(4)}  # attention device a holds rows [4a, 4a+4)
    dst = {10 + e: (0, 16) for e in range(4)}  # every expert device needs all 16 rows
    host = {0: 0, 1: 0, 2: 1, 3: 1, 10: 0, 11: 0, 12: 1, 13: 1}
    for form in ("direct", "two_phase"):
        msgs = plan(src, dst, host, form)
        held = {d: {r for r in range(*rows)} for d, rows in src.items()}
        for m in msgs:  # replay: a device sends only rows it holds by then
            assert set(range(m.lo, m.hi)) <= held[m.src], (form, m)
            held.setdefault(m.dst, set()).update(range(m.lo, m.hi))
        assert all(held[d] >= set(range(*rows)) for d, rows in dst.items()), form
    direct, two = (traffic_of(plan(src, dst, host, f), row_bytes=100) for f in ("direct", "two_phase"))
    assert (direct.messages, direct.cross_host_messages) == (16, 8)
    assert two.cross_host_messages == 2  # host 0 -> host 1 and host 1 -> host 0
    assert two.cross_host_bytes < direct.cross_host_bytes
    many = {e: (0, 16) for e in range(10, 14)}
    slow_network = LINKS["nvlink4"]
    assert seconds(plan(src, many, host, "two_phase"), 100, slow_network) != \
        seconds(plan(src, many, host, "direct"), 100, slow_network)


def test_micro_batches_take_each_request_whole():
    rng = np.random.default_rng(0)
    shards, width = 4, 16
    valid = np.zeros(shards * width, bool)
    seq_ids = np.zeros(shards * width, np.int32)
    request = 0
    for s in range(shards):
        row = s * width
        for n in rng.integers(1, 6, rng.integers(0, 4)):
            valid[row:row + n], seq_ids[row:row + n] = True, request
            request, row = request + 1, row + n
    for m in (1, 2, 3):
        batches = split_rows(valid, seq_ids, shards, m)
        assert 1 <= len(batches) <= m
        taken = np.concatenate([b[b >= 0] for b in batches])
        assert sorted(taken.tolist()) == np.flatnonzero(valid).tolist()  # every real row once
        for b in batches:
            w = len(b) // shards
            for s in range(shards):  # a micro-batch's shard s holds rows of shard s only
                own = b[s * w:(s + 1) * w]
                assert all(s * width <= r < (s + 1) * width for r in own[own >= 0])
            for r in set(seq_ids[b[b >= 0]].tolist()):  # each request whole in one micro-batch
                assert set(np.flatnonzero(valid & (seq_ids == r))) <= set(b.tolist())
    assert len(split_rows(valid, seq_ids, shards, 2)) == 2


def test_micro_batch_count_follows_the_costs():
    assert choose_micro_batches(1.0, 1.0, 0.0) == 3  # balanced and free: as many as allowed
    assert choose_micro_batches(1.0, 1e-4, 0.01) == 1  # nothing to hide behind the attention
    assert choose_micro_batches(1.0, 1.0, 10.0) == 1  # each micro-batch costs more than it hides
    assert choose_micro_batches(1.0, 0.3, 0.1) == 2
    with pytest.raises(ValueError, match="negative"):
        choose_micro_batches(-1.0, 1.0, 0.0)


def test_busy_intervals_and_overlap():
    """attention 0-2, experts waits for it (2-5) while attention runs 2-4: overlap 2 s."""
    events = [("attention", 0.0, ()), ("experts", 0.5, (0,)), ("attention", 1.0, ())]
    b = busy(events, [2.0, 5.0, 4.0])
    assert (b.attention_s, b.experts_s, b.overlap_s, b.wall_s) == (4.0, 3.0, 2.0, 5.0)


# --- bad input ---------------------------------------------------------------------------------------

def test_split_layout_on_the_jax_executor_names_disagg():
    with pytest.raises(ValueError, match="executor='disagg'"):
        build(split_model(ARCH, "cpu8-attn4-exp4"), "jax", **SIZES)


def test_disagg_needs_a_split_layout():
    with pytest.raises(LayoutError, match="split layout"):
        build(ARCH, "disagg", layout="cpu8-ep", **SIZES)
    with pytest.raises(LayoutError, match="colocated"):
        build(load_model(ARCH, seed=3)[0], "disagg", **SIZES)


def test_expert_pool_too_small_is_refused_before_loading():
    with pytest.raises(LayoutError, match=r"expert pool .* needs 0\.\d+ GiB of routed experts per device"):
        build(ARCH, "disagg", layout="cpu8-attn6-exp2", device_memory=1 << 20, **SIZES)


def test_expert_pool_counts_the_replica_slots_it_copies(monkeypatch):
    """Memory that holds the layout's own expert split refuses replicas that copy slots beside it, and
    names them; the layout's own split given as replica lists copies nothing and passes."""
    import moejax.checkpoint
    from moejax.disagg.executor import check_expert_pool, routed_expert_bytes_per_device

    cfg, placements = PRESETS[ARCH], moejax.checkpoint.placements_for("cpu8-attn4-exp4")
    own = routed_expert_bytes_per_device(cfg, placements)
    check_expert_pool(cfg, placements, own)
    check_expert_pool(cfg, placements, own, replicas=[list(range(n * 4, n * 4 + 4)) for n in range(4)])
    with pytest.raises(LayoutError, match=r"GiB of them replica slots\) .* or fewer expert_slots"):
        check_expert_pool(cfg, placements, own, replicas="auto", expert_slots=6)
    monkeypatch.setattr(moejax.checkpoint, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    with pytest.raises(ValueError, match="needs expert_slots="):  # a bad option, before any loading
        build(ARCH, "disagg", layout="cpu8-attn4-exp4", replicas="auto", **SIZES)


@pytest.mark.parametrize("options, match", [
    (dict(micro_batches=0), "micro_batches=0"),
    (dict(exchange="all_to_all"), "exchange='all_to_all'"),
])
def test_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        build(split_model(ARCH, "cpu8-attn4-exp4"), "disagg", **SIZES, **options)


@pytest.mark.parametrize("options, match", [
    (dict(replicas=[[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 16]]),
     "instance 3 holds a replica of expert 16, but the model has experts 0..15"),
    (dict(replicas=[[0, 1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15]], expert_slots=4),
     "instance 0 holds 5 experts, more than its expert_slots=4"),
    (dict(replicas=[list(range(8)), list(range(8, 16))]), "experts of 2 instances; the expert pool has 4"),
    (dict(replicas=[[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14]]), r"experts \[15\] have no replica"),
    (dict(replicas="auto"), "replicas='auto' needs expert_slots="),
    (dict(replicas="auto", expert_slots=3), "4 instances x 3 expert slots hold 12 experts, fewer than the model's 16"),
    (dict(activation_policy="tokens"), "activation_policy='tokens': expected one of janus, token"),
])
def test_bad_replicas(options, match):
    with pytest.raises(ValueError, match=match):
        build(split_model(ARCH, "cpu8-attn4-exp4"), "disagg", **SIZES, **options)


def test_llm_picks_disagg_for_a_split_layout():
    llm = LLM(ARCH, seed=3, layout="cpu8-attn4-exp4", **SIZES)
    assert type(llm.engine.executor).__name__ == "DisaggExecutor"


@pytest.mark.slow
def test_two_processes_match_one(tmp_path, capsys):
    """2 processes x 4 CPU devices on loopback, each pool taking 2 devices of each process (moves are
    resharding programs over both pools' devices): the same tokens as one process with 8 devices."""
    from test_multihost import PROCESS_TIMEOUT_S, finish, free_port, launch

    from moejax.cli import main

    command = ["moejax", "generate", "--model", ARCH, "--layout", "cpu8-attn4-exp4", "--ignore-eos", "--json",
               "--max-tokens", "4", "--prompt-token-ids", "1,2,3,4,5", "--prompt-token-ids", "7,8,9"]
    assert main(command[1:]) == 0
    want = json.loads(capsys.readouterr().out)["outputs"]
    port = free_port()
    procs = [launch(0, port, command, tmp_path), launch(1, port, command, tmp_path)]
    codes = finish(procs, PROCESS_TIMEOUT_S)
    assert codes == [0, 0], (tmp_path / "err0").read_text()[-3000:] + (tmp_path / "err1").read_text()[-3000:]
    got = json.loads((tmp_path / "out0").read_text())["outputs"]
    assert [o["token_ids"] for o in got] == [o["token_ids"] for o in want]
