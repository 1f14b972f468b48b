"""A prefill process and a decode process behind the router, the KV streamed over an emulated loopback
link: greedy tokens equal one engine's, and no request is lost when the link is cut, the prefill
process is killed or the decode process restarts. One router (two processes, restarted in place)
serves every case; the in-process parts of the stream are tests/test_pd_link.py.

Slow (process start-up and each restart re-trace the programs; the compilation cache spares the
compiles): `pytest -m slow tests/test_pd_processes.py`."""

import time

import numpy as np
import pytest

from moejax.engine import build
from moejax.engine.sampling import RequestError, SamplingParams
from moejax.pd import LinkSpec, Router

pytestmark = pytest.mark.slow

MODEL = "tiny-qwen3-moe"
SIZES = dict(max_model_len=64, block_size=4, token_budget=32, num_blocks=96, max_num_seqs=8)
GREEDY = SamplingParams(max_tokens=6, ignore_eos=True)
THRESHOLD = 16
FAST = 4e6  # bytes/s: a tiny model's KV over a scaled link


@pytest.fixture(scope="module")
def router():
    """The processes inherit tests/conftest.py's compilation cache through the environment."""
    r = Router(MODEL, threshold=THRESHOLD, link=LinkSpec(FAST, latency_s=0.002, connections=3), engine_options=SIZES,
               retries=2, worker_args=["--matmul-precision", "highest"])  # as tests/conftest.py sets it here
    r.start()
    yield r
    r.close()


@pytest.fixture(scope="module")
def reference():
    """One engine: what every request must give, whatever route and fault it met."""
    one = build(MODEL, **SIZES)

    def tokens(prompts):
        reqs = [one.add_request(p, GREEDY) for p in prompts]
        while one.has_unfinished:
            one.step()
        return [r.output_token_ids for r in reqs]
    return tokens


def prompts(lengths, seed):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 512, n).tolist() for n in lengths]


def run(router, ps):
    """Outputs and per-request metrics, once every request shipped over the link has its transfer
    report too (the prefill process sends it after its last write: it may come after the tokens)."""
    ids = [router.submit(p, GREEDY) for p in ps]
    out = router.wait(ids, timeout=600)
    wait_until(lambda: all(q["kv_bytes"] for q in router.metrics(ids)["requests"] if q["route"] == "prefill"), 60)
    by_id = {q["request_id"]: q for q in router.metrics()["requests"]}
    return [out[i] for i in ids], [by_id[i] for i in ids]


def wait_until(condition, timeout=300):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_two_processes_give_one_engines_tokens(router, reference):
    ps = prompts([5, 30, 12, 40, 20], seed=0)
    out, info = run(router, ps)
    assert out == reference(ps)
    assert [q["route"] for q in info] == ["local" if len(p) < THRESHOLD else "prefill" for p in ps]
    for p, q in zip(ps, info):
        if q["route"] == "prefill":  # k and v of 4 layers x 2 KV heads x 32 dims in fp32, plus headers
            assert 4 * len(p) * 2 * 2 * 32 * 4 < q["kv_bytes"] < 4 * len(p) * 2 * 2 * 32 * 4 + 4096
    m = router.metrics()
    wait_until(lambda: router.metrics()["link"]["bytes_received"] == m["link"]["kv_bytes_shipped"], 10)
    link = router.metrics()["link"]
    assert link["bytes_sent"] == link["bytes_received"] == link["kv_bytes_shipped"]
    with pytest.raises(RequestError, match=r"outside the vocabulary \[0, 512\)"):
        router.submit([1, 2, 999], GREEDY)
    seen = []  # the threshold hook decides: here it keeps a long prompt home
    router.choose_threshold = lambda state: seen.append(state) or 10**9
    try:
        out, info = run(router, ps[3:4])
    finally:
        router.choose_threshold = None
    assert out == reference(ps[3:4]) and info[0]["route"] == "local"
    assert len(seen) == 1 and seen[0].link_rate == FAST and seen[0].prefill_queue == 0


def test_cut_link_is_retried_then_the_request_prefills_locally(router, reference):
    ps = prompts([24, 28], seed=1)
    router.cut_link(2)  # two messages break: resent (retries=2)
    out0, (q0,) = run(router, ps[:1])
    router.cut_link(1000)  # the link stays down: given up, prefilled by the decode process
    out1, (q1,) = run(router, ps[1:])
    router.cut_link(0)
    assert out0 + out1 == reference(ps)
    assert (q0["route"], q0["resends"], q0["faults"]) == ("prefill", 2, [])
    assert q1["route"] == "local-fallback" and "link cut (injected)" in q1["faults"][0]


def test_killed_prefill_process_its_requests_rerouted(router, reference):
    ps = prompts([20, 33, 26], seed=2)
    router.set_link(LinkSpec(2e3, burst_bytes=1500))  # slow: the requests sit at the prefill process
    ids = [router.submit(p, GREEDY) for p in ps]
    first = router.pid("prefill")
    router.kill("prefill")
    out = router.wait(ids, timeout=600)
    router.set_link(LinkSpec(FAST, latency_s=0.002))
    assert [out[i] for i in ids] == reference(ps)
    info = [router.metrics()["requests"][i] for i in ids]
    assert all(q["route"] == "rerouted" and q["faults"] == ["prefill process died"] for q in info)
    router.wait_ready()
    assert router.pid("prefill") not in (None, first)  # restarted; serves again
    out, info = run(router, prompts([22], seed=3))
    assert out == reference(prompts([22], seed=3)) and info[0]["route"] == "prefill"


def test_restarted_decode_process_gets_its_requests_again(router, reference):
    ps = prompts([6, 25, 9, 30], seed=4)
    ids = [router.submit(p, GREEDY) for p in ps]
    wait_until(lambda: any(router.requests[i].where == "decode" for i in ids))
    first = router.pid("decode")
    router.kill("decode")
    out = router.wait(ids, timeout=600)
    assert [out[i] for i in ids] == reference(ps)
    info = [router.metrics()["requests"][i] for i in ids]
    assert any(q["route"] == "resubmitted" for q in info)
    assert all(q["faults"] in ([], ["decode process died"]) or q["route"] == "local-fallback" for q in info)
    assert router.pid("decode") not in (None, first)



@pytest.mark.parametrize("order", [("sent", "admitted", "done"), ("admitted", "done", "sent")])
def test_a_transfer_report_after_the_tokens_is_still_counted(order):
    """The prefill process reports a transfer after its last write; the decode process may finish the
    request before that report arrives. Either order gives the request its KV bytes and resends (the
    router's handling of the messages alone, no processes)."""
    from moejax.pd.router import Tracked
    r = Router(MODEL)
    try:
        t = r.requests[0] = Tracked(0, [1] * 20, GREEDY, 0.0, route="prefill", where="prefill")
        messages = {"sent": ("prefill", dict(op="sent", request_id=0, attempt=0, kv_bytes=4321, transfer_s=0.01,
                                             failures=2, bytes_before_handoff=100)),
                    "admitted": ("decode", dict(op="admitted", request_id=0, attempt=0, via="kv")),
                    "done": ("decode", dict(op="done", request_id=0, token_ids=[5, 6], finish_reason="length"))}
        for name in order:
            r._on_message(*messages[name])
        q = r.metrics()["requests"][0]
        assert (q["kv_bytes"], q["resends"], q["kv_bytes_before_handoff"]) == (4321, 2, 100)
        assert t.token_ids == [5, 6] and t.where == "decode"
    finally:
        r.close()
