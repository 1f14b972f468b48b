"""Gated DeltaNet: the chunked prefill form and the recurrent decode form equal a plain per-token
reference (float64 numpy, the rule written as S = exp(g) (I - beta k k^T) S + beta k v^T) on fresh
random inputs; in a layer, a prompt taken whole, in chunks across calls (state carried through its
slot), token by token, or batched with other requests gives the same output."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from moejax.config import get_preset
from moejax.engine.metadata import attention_metadata
from moejax.models.gated_deltanet import CHUNK, causal_conv, chunk_step, recurrent_step
from moejax.models.model import build_model

HV, DK, DV = 4, 8, 6


def reference(state, q, k, v, g, beta):
    """Per token, float64: S = exp(g) (I - beta k k^T) S + beta k v^T, o = S^T q (per head)."""
    S = np.array(state, np.float64)
    out = np.zeros((len(q), HV, DV))
    for t in range(len(q)):
        for h in range(HV):
            kt = k[t, h][:, None]
            S[h] = np.exp(g[t, h]) * (np.eye(DK) - beta[t, h] * kt @ kt.T) @ S[h] + beta[t, h] * kt @ v[t, h][None]
            out[t, h] = S[h].T @ q[t, h]
    return out, S


def random_inputs(rng, n):
    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)
    q = unit(rng.normal(size=(n, HV, DK))) * DK ** -0.5
    k = unit(rng.normal(size=(n, HV, DK)))
    v = rng.normal(size=(n, HV, DV))
    g = -rng.uniform(0.01, 1.5, size=(n, HV))
    beta = rng.uniform(0.05, 1.0, size=(n, HV))
    return [a.astype(np.float32) for a in (q, k, v, g, beta)]


def chunked(state, inputs, cuts, chunk):
    """The sequence cut at `cuts` (prompt chunks of successive iterations), each cut piece in chunks
    of `chunk` rows (the last one padded with g = beta = 0 rows), the state carried throughout."""
    n, outs = len(inputs[0]), []
    for a, b in zip([0, *cuts], [*cuts, n]):
        for c in range(a, b, chunk):
            m = min(chunk, b - c)
            piece = [np.pad(x[c:c + m], [(0, chunk - m)] + [(0, 0)] * (x.ndim - 1)) for x in inputs]
            o, state = jax.jit(chunk_step)(state, *piece)
            outs.append(np.asarray(o)[:m])
    return np.concatenate(outs), np.asarray(state)


def test_chunked_and_recurrent_forms_equal_the_per_token_reference():
    rng = np.random.default_rng(0)
    n = 45
    inputs = random_inputs(rng, n)
    state0 = rng.normal(size=(HV, DK, DV)).astype(np.float32)
    want, want_state = reference(state0, *inputs)

    step = jax.jit(recurrent_step)
    state, outs = state0[None], []
    for t in range(n):
        o, state = step(state, *(x[t:t + 1] for x in inputs))
        outs.append(np.asarray(o)[0])
    np.testing.assert_allclose(np.stack(outs), want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(state)[0], want_state, rtol=1e-4, atol=1e-5)

    for cuts, chunk in (((), 64), ((), 16), ((7, 8, 30), 16), ((20,), 8)):
        got, got_state = chunked(state0, inputs, cuts, chunk)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=f"cuts {cuts}, chunk {chunk}")
        np.testing.assert_allclose(got_state, want_state, rtol=1e-4, atol=1e-5, err_msg=f"cuts {cuts}, chunk {chunk}")


def test_recurrent_step_is_per_request():
    """A batch of requests, each its own state: the same as each alone."""
    rng = np.random.default_rng(1)
    inputs = random_inputs(rng, 5)  # 5 requests, one token each
    states = rng.normal(size=(5, HV, DK, DV)).astype(np.float32)
    out, new = recurrent_step(states, *inputs)
    for b in range(5):
        want, want_state = reference(states[b], *(x[b:b + 1] for x in inputs))
        np.testing.assert_allclose(np.asarray(out)[b], want[0], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(np.asarray(new)[b], want_state, rtol=1e-4, atol=1e-5)


def test_causal_conv_carries_its_state():
    """The conv of a sequence in pieces, each starting from the inputs the previous one left, equals
    the conv of the whole (a direct sum over the taps, zeros before the start)."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(11, 5)).astype(np.float32)
    taps = rng.normal(size=(4, 5)).astype(np.float32)
    padded = np.concatenate([np.zeros((3, 5)), x])
    want = np.stack([(padded[t:t + 4] * taps).sum(0) for t in range(11)])
    want = want / (1 + np.exp(-want))
    state, outs = jnp.zeros((3, 5)), []
    for a, b in ((0, 2), (2, 3), (3, 11)):
        y, inputs = causal_conv(state, x[a:b], taps)
        state = inputs[-3:]
        outs.append(np.asarray(y))
    np.testing.assert_allclose(np.concatenate(outs), want, rtol=1e-5, atol=1e-6)


# --- in the layer: the same prompt whole, in chunks, token by token, batched ----------------------------

@pytest.fixture(scope="module")
def model():
    return build_model(get_preset("tiny-qwen3-next"), seed=5)


def attend(model, kv, x, rows):
    """Layer 0 (Gated DeltaNet) on rows [(slot, positions)] laid out one request after another."""
    positions = np.concatenate([p for _, p in rows])
    seq_ids = np.concatenate([np.full(len(p), i) for i, (_, p) in enumerate(rows)])
    meta = attention_metadata(positions, seq_ids, np.zeros((len(rows), 8), np.int32), 16, 1,
                              state_slots=np.array([s for s, _ in rows]), num_state_slots=4)
    h, kv = model.attend(0, jnp.pad(x, ((0, len(meta.positions) - len(x)), (0, 0))), kv, meta)
    return np.asarray(h)[:len(x)], kv


def test_layer_prompt_whole_chunked_token_by_token_and_batched(model):
    rng = np.random.default_rng(3)
    n = CHUNK + 36  # two tiles when whole
    x = jnp.asarray(rng.normal(size=(n, model.config.hidden_size)).astype(np.float32))

    def fresh():
        return model.init_kv_cache(1, 16, state_slots=4)[0]

    whole, _ = attend(model, fresh(), x, [(2, np.arange(n))])

    kv, pieces = fresh(), []
    for a, b in ((0, 30), (30, 31), (31, n)):  # prompt chunks of successive iterations, one a single row
        h, kv = attend(model, kv, x[a:b], [(1, np.arange(a, b))])
        pieces.append(h)
    np.testing.assert_allclose(np.concatenate(pieces), whole, rtol=2e-5, atol=2e-5)

    kv, steps = fresh(), []
    for t in range(40):  # the first 40 rows as decodes
        h, kv = attend(model, kv, x[t:t + 1], [(3, np.array([t]))])
        steps.append(h)
    np.testing.assert_allclose(np.concatenate(steps), whole[:40], rtol=2e-5, atol=2e-5)

    # One iteration holding a decode of that request (slot 3, position 40), a fresh prompt in a slot
    # with stale contents (slot 1: a zero state, whatever the slot held) and a continued chunk of
    # another request (slot 0) -- each as if alone.
    other, _ = attend(model, fresh(), x[:30], [(0, np.arange(30))])
    kv = attend(model, kv, x[:20], [(0, np.arange(20))])[1]
    mixed = jnp.concatenate([x[40:41], x[:21], x[20:30]])
    h, _ = attend(model, kv, mixed, [(3, np.array([40])), (1, np.arange(21)), (0, np.arange(20, 30))])
    np.testing.assert_allclose(h[:1], whole[40:41], rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(h[1:22], whole[:21], rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(h[22:], other[20:30], rtol=2e-5, atol=2e-5)


def test_rows_no_longer_valid_leave_their_slot(model):
    """Multi-step decode turns the rows of requests that stopped into padding (meta.advance): their
    state slots keep what they held, while the other rows' slots advance."""
    x = jnp.asarray(np.random.default_rng(4).normal(size=(8, model.config.hidden_size)).astype(np.float32))
    meta = attention_metadata(np.array([5, 9]), np.array([0, 1]), np.zeros((2, 8), np.int32), 16, 1,
                              state_slots=np.array([2, 1]), num_state_slots=4)
    meta = meta.replace(valid=meta.valid.at[0].set(False))
    _, (conv, recurrent) = model.attend(0, x, model.init_kv_cache(1, 16, state_slots=4)[0], meta)
    assert not np.any(conv[2]) and not np.any(recurrent[2])
    assert np.any(conv[1]) and np.any(recurrent[1])
