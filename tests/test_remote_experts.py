"""Routed experts in an expert server process (executor "remote-experts", moejax.disagg.remote): greedy
outputs equal the colocated executor's for one and two micro-batches, with dense layers, shared and
biased experts, chunked and layered; every MoE layer of every micro-batch is served by the server,
whose compute times make the timeline's expert pool; a server killed mid-run is replaced with no
request lost, or, where an iteration cannot run twice, fails the step (StepError naming its requests);
a server holding other weights or one that cannot start is a clear error; a server started apart
connects to an engine that listens."""

import os
import socket
import subprocess
import sys

import pytest

from moejax.checkpoint import load_model
from moejax.disagg.timeline import Timeline
from moejax.engine import build
from moejax.engine.engine import StepError
from moejax.engine.sampling import SamplingParams

PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9], [(11 * i + 3) % 500 for i in range(23)], [5] * 12, [42]]
GREEDY = SamplingParams(max_tokens=5, ignore_eos=True)
SIZES = dict(max_model_len=64, block_size=4, num_blocks=96, policy="chunked@8", seed=3)
LAYERED = dict(policy="layered", group_table=((10_000, 2),))  # every prompt in 2 layer groups: rows kept


def generate(engine, prompts=PROMPTS):
    reqs = [engine.add_request(p, GREEDY) for p in prompts]
    outs = []
    while engine.has_unfinished:
        outs.append(engine.step())
    return [r.output_token_ids for r in reqs], outs


def test_greedy_equals_colocated_and_every_moe_layer_is_served_remotely():
    want = generate(build("tiny-qwen3-moe", "jax", fuse=False, **SIZES))[0]
    for m in (1, 2):
        engine = build("tiny-qwen3-moe", "remote-experts", micro_batches=m, **SIZES)
        got, outs = generate(engine)
        assert got == want, m
        decode = [o for o in outs if o.plan.slices and not o.plan.num_prefill_tokens]
        assert decode and all(o.result.extra["expert_busy_s"] > 0 for o in decode)
        # the last step: each attention stage (one per layer, all MoE, and micro-batch) was answered by
        # one span timed in the server; one more attention piece per micro-batch: the last combine
        spans, layers = engine.executor.last_pools.spans, engine.executor.config.num_layers
        micro = len(spans["experts"]) // layers
        assert micro >= 1 and len(spans["experts"]) == layers * micro
        assert len(spans["attention"]) == (layers + 1) * micro
        engine.executor.close()
        assert engine.executor.server.process.wait(timeout=30) == 0


@pytest.mark.slow
@pytest.mark.parametrize("arch, policy", [
    ("tiny-qwen2-moe", LAYERED),                # a dense layer, shared experts; rows kept between iterations
    ("tiny-gpt-oss", {"policy": "chunked@8"}),  # biased experts
], ids=["tiny-qwen2-moe-layered", "tiny-gpt-oss-chunked"])
def test_greedy_equals_colocated_other_architectures_and_policies(arch, policy):
    prompts, sizes = PROMPTS[:2], {**SIZES, **policy}
    got, _ = generate(build(arch, "remote-experts", micro_batches=2, **sizes), prompts)
    assert got == generate(build(arch, "jax", fuse=False, **sizes), prompts)[0]


def test_a_server_with_other_weights_is_refused():
    model = load_model("tiny-qwen3-moe", seed=5)[0]  # the server loads the preset with the engine's seed (3)
    with pytest.raises(ValueError, match="holds other experts than this engine's model: fingerprint differ"):
        build(model, "remote-experts", **SIZES)


def test_a_server_that_cannot_start_is_a_clear_error():
    with pytest.raises(ConnectionError, match=r"expert server \(pid \d+\) exited with code [1-9]"):
        build(load_model("tiny-qwen3-moe")[0], "remote-experts", server_model="no-such-model", **SIZES)


def test_a_server_killed_mid_run_is_replaced_and_no_request_is_lost():
    want = generate(build("tiny-qwen3-moe", "jax", fuse=False, **SIZES))[0]
    engine = build("tiny-qwen3-moe", "remote-experts", **SIZES)
    reqs = [engine.add_request(p, GREEDY) for p in PROMPTS]
    engine.step()
    first = engine.executor.server.process
    first.kill()
    first.wait()
    while engine.has_unfinished:
        engine.step()
    assert [r.output_token_ids for r in reqs] == want
    assert engine.executor.server_restarts == 1 and engine.executor.server.process.pid != first.pid


def test_a_server_lost_where_an_iteration_cannot_run_twice_fails_the_step():
    engine = build("tiny-qwen3-moe", "remote-experts", **{**SIZES, **LAYERED})
    engine.add_request(PROMPTS[2], GREEDY)  # its first iteration stops at layer 2, its rows kept
    engine.executor.server.process.kill()
    engine.executor.server.process.wait()
    with pytest.raises(StepError, match=r"requests \[0\]: ConnectionError\(.expert server \(pid \d+\) went away"):
        engine.step()


def test_a_server_started_elsewhere_connects_to_a_listening_engine(monkeypatch):
    monkeypatch.setenv("MOEJAX_EXPERTS_AUTHKEY", os.urandom(16).hex())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    server = subprocess.Popen([sys.executable, "-m", "moejax.disagg.remote", "--model", "tiny-qwen3-moe",
                               "--seed", "3", "--connect", address])  # before the engine listens: it retries
    engine = build("tiny-qwen3-moe", "remote-experts", listen=address, **SIZES)
    assert generate(engine, PROMPTS[:2])[0] == generate(build("tiny-qwen3-moe", "jax", fuse=False, **SIZES),
                                                        PROMPTS[:2])[0]
    engine.executor.close()
    assert server.wait(timeout=30) == 0
    monkeypatch.delenv("MOEJAX_EXPERTS_AUTHKEY")
    with pytest.raises(ValueError, match="set MOEJAX_EXPERTS_AUTHKEY"):
        build("tiny-qwen3-moe", "remote-experts", listen=address, **SIZES)


def test_bad_options_are_clear_errors():
    with pytest.raises(ValueError, match="qwen3-8b has no routed experts"):
        build("qwen3-8b", "remote-experts", **SIZES)
    with pytest.raises(ValueError, match="micro_batches=0"):
        build("tiny-qwen3-moe", "remote-experts", micro_batches=0, **SIZES)


def test_a_span_timed_elsewhere_joins_the_timeline():
    timeline = Timeline()
    experts = timeline.add_span("experts", 10.0, 10.5)
    timeline.events.append(("attention", 10.2, (experts,)))  # dispatched before the experts were done
    timeline.ready.append(10.8)
    busy = timeline.finish()
    assert busy.spans["experts"] == [(10.0, 10.5)]
    assert busy.spans["attention"] == [(10.5, 10.8)]  # waits for the experts' output
    assert busy.overlap_s == 0.0 and busy.wall_s == pytest.approx(0.8)
