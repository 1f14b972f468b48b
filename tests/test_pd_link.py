"""The KV stream in one process: the wire format carries any layer-state kind bit for bit, the token
bucket holds its rate, a prefill engine's layers leave as they finish (before the hand-off) and
arrive intact over several loopback connections, a cut link is retried and, past its retries, given
up. The two-process runs are tests/test_pd_processes.py."""

import functools
import socket
import threading

import jax.numpy as jnp
import numpy as np
import pytest

from moejax.config import get_preset
from moejax.engine import build
from moejax.engine.kv_transfer import LayerKVState
from moejax.engine.sampling import SamplingParams
from moejax.models.model import build_model
from moejax.pd.link import KVReceiver, KVSender, LinkSpec, TokenBucket
from moejax.pd.streaming import LayerStreamer
from moejax.pd.wire import WireError, decode_layer, layer_message, read_message, request_message

GREEDY = SamplingParams(max_tokens=6, ignore_eos=True)
SIZES = dict(max_model_len=64, block_size=4, token_budget=32, num_blocks=96)


@functools.cache
def model(preset: str = "tiny-qwen3-moe"):
    return build_model(get_preset(preset), seed=5)


def prompts(n_tokens=(9, 23, 17)):
    rng = np.random.default_rng(1)
    return [rng.integers(0, model().config.vocab_size, n).tolist() for n in n_tokens]


def serve(e):
    while e.has_unfinished:
        e.step()


def test_any_state_kind_crosses_the_wire_bit_for_bit():
    """A kind the transport has never heard of (a recurrent state, as linear attention hands off),
    with bf16 and fp32 arrays of any rank, arrives unchanged; a message cut short is an error."""
    rng = np.random.default_rng(0)
    state = LayerKVState("recurrent", {"conv": jnp.asarray(rng.normal(size=(3, 4, 5)), jnp.bfloat16),
                                       "ssm": rng.normal(size=(2, 7)).astype(np.float32)})
    message = layer_message(7, 2, 5, state)
    a, b = socket.socketpair()
    with a, b:
        a.sendall(message + message[:len(message) - 3])
        a.shutdown(socket.SHUT_WR)
        header, body, n = read_message(b)
        with pytest.raises(WireError, match="ended"):
            read_message(b)
    assert (header["request_id"], header["attempt"], header["layer"], n) == (7, 2, 5, len(message))
    got = decode_layer(header, body)
    assert got.kind == "recurrent" and set(got.arrays) == {"conv", "ssm"}
    for name, want in state.arrays.items():
        assert got.arrays[name].dtype == jnp.dtype(want.dtype) and got.arrays[name].shape == want.shape
        assert np.asarray(got.arrays[name]).tobytes() == np.asarray(want).tobytes()
    header["arrays"][1][2] = [2, 8]  # claims more bytes than the body holds
    with pytest.raises(WireError, match="array 'ssm' float32\\[2, 8\\] runs past"):
        decode_layer(header, body)


def test_token_bucket_paces_bytes_at_its_rate():
    """On a fake clock: after the first burst, bytes go at `rate`, however they are chunked."""
    now = [0.0]
    bucket = TokenBucket(rate=1000.0, burst=100, clock=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s))
    for n in (100, 50, 50, 100, 300, 400):
        bucket.take(n)
    assert now[0] == pytest.approx((1000 - 100) / 1000)  # 1000 bytes, 100 of them the initial burst
    now[0] += 10.0  # idle: the bucket refills to its depth, no further
    bucket.take(100)
    bucket.take(100)
    assert now[0] == pytest.approx(0.9 + 10.0 + 0.1)


def streamed_engine(m=None):
    """A layered prefill engine, one layer per iteration, handing off every request."""
    m = m or model()
    return build(m, policy="layered", group_table=(), max_groups=m.config.num_layers, **SIZES)


@pytest.mark.slow  # compiles a layered prefill engine's per-layer programs besides the fused ones
# Qwen3-Next: its Gated DeltaNet layers' recurrent states leave as their layers finish, like KV
@pytest.mark.parametrize("preset", ["tiny-qwen3-moe", "tiny-qwen3-next"])
def test_layers_leave_while_the_prompt_prefills_and_decode_elsewhere_as_one_engine(preset):
    m = model(preset)
    L = m.config.num_layers
    one = build(m, **SIZES)
    reqs = [one.add_request(p, GREEDY) for p in prompts()]
    serve(one)
    want = [r.output_token_ids for r in reqs]

    e = streamed_engine(m)
    events = []  # (step, request, layer) of each layer sent; (step, request, None) at the hand-off
    step = [0]
    streamer = LayerStreamer(e, lambda rid, layer, state: events.append((step[0], rid, layer, state)),
                             lambda h, layers: events.append((step[0], h.request_id, None, h)))
    for p in prompts():
        e.add_request(p, GREEDY, handoff=True)
    while e.has_unfinished:
        streamer.after_step(e.step())
        step[0] += 1
    decode = build(m, **SIZES)
    continued = []
    for rid in range(3):
        mine = [ev for ev in events if ev[1] == rid]
        layers = [ev[2] for ev in mine if ev[2] is not None]
        assert sorted(layers) == list(range(L)) and mine[-1][2] is None
        handoff = mine[-1][3]
        first_sent = min(ev[0] for ev in mine if ev[2] == 0)
        assert first_sent < mine[-1][0]  # layer 0 left iterations before the prefill ended
        for _, _, layer, state in mine[:-1]:  # what left early is the KV the request ends with
            final = handoff.kv.states[handoff.kv.layers.index(layer)]
            assert state.kind == final.kind
            for name in final.arrays:
                np.testing.assert_array_equal(state.arrays[name], final.arrays[name])
        continued.append(decode.add_prefilled(handoff))
    serve(decode)
    assert [r.output_token_ids for r in continued] == want


def test_sender_stripes_over_connections_retries_cuts_and_gives_up():
    e = streamed_engine()
    for p in prompts():
        e.add_request(p, GREEDY, handoff=True)
    serve(e)
    handoffs = list(e.handoffs)
    receiver = KVReceiver()
    sent, failed = [], []
    done = threading.Event()

    def on_sent(t, seconds):
        sent.append(t)
        done.set()

    sender = KVSender(receiver.address, LinkSpec(connections=3), retries=2, on_sent=on_sent,
                      on_failed=lambda t, why: (failed.append((t, why)), done.set()))

    def ship(h, attempt):
        done.clear()
        for layer, state in zip(h.kv.layers, h.kv.states):
            sender.send_layer(h.request_id, attempt, layer, state)
        sender.finish(h, attempt, list(h.kv.layers))
        assert done.wait(30)

    try:
        ship(handoffs[0], 1)  # clean
        sender.cut(2)  # two messages break half-way: resent
        ship(handoffs[1], 1)
        sender.cut(1000)  # the link stays down: 2 retries, then given up
        ship(handoffs[2], 1)
        sender.cut(0)
        got = [receiver.ready.get(timeout=10) for _ in range(2)]
    finally:
        sender.close()
        receiver.close()
    assert [t.failures for t in sent] == [0, 2] and receiver.ready.empty()
    assert len(failed) == 1 and failed[0][0].request_id == handoffs[2].request_id and failed[0][0].failures == 3
    assert "link cut (injected)" in failed[0][1]
    for (h, attempt), want in zip(sorted(got, key=lambda g: g[0].request_id), handoffs[:2]):
        assert attempt == 1 and h.prompt_token_ids == want.prompt_token_ids and h.seed == want.seed
        assert h.output_token_ids == want.output_token_ids and h.params == want.params
        assert h.kv.layers == want.kv.layers and h.kv.layout == want.kv.layout
        for a, b in zip(h.kv.states, want.kv.states):
            for name in b.arrays:
                np.testing.assert_array_equal(a.arrays[name], b.arrays[name])
    whole = [sum(len(layer_message(h.request_id, 1, layer, state)) for layer, state in zip(h.kv.layers, h.kv.states))
             + len(request_message(h, 1, list(h.kv.layers))) for h in handoffs[:2]]
    assert whole[0] > handoffs[0].kv.nbytes and sent[0].bytes_sent == whole[0]  # a clean transfer: its messages
    assert sent[1].bytes_sent > whole[1]  # the cut messages' first halves went out too
    assert receiver.bytes_received == sum(whole)  # whole messages only
