"""The native CPU dense kernel (kernels/native/dense.cc) behind kernels.dense / row_sum / softmax: against
XLA on fresh random inputs, a row's result independent of the other rows (bit for bit), and XLA's own
operations where GSPMD partitions the program."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import kernels

# (K, [N per weight]): the 16-column register blocks; an 8-lane block and single columns after them (N = 200:
# 12 blocks + 8 lanes, N = 17: one block + a column, N = 8: one 8-lane block alone); one output column
SHAPES = [(128, [128, 64, 64]), (33, [200]), (96, [17, 8]), (40, [1])]


def random_problem(rng, M, K, Ns, dtype):
    x = jnp.asarray(rng.normal(size=(M, K)), dtype)
    return x, [jnp.asarray(rng.normal(size=(K, N)) / np.sqrt(K), dtype) for N in Ns]


def as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{'+'.join(map(str, s[1]))}")
def test_dense_matches_xla(shape, dtype):
    """x @ w for every weight in one call: float32 accumulation of the inputs as given, like XLA's dot."""
    rng = np.random.default_rng()
    x, ws = random_problem(rng, 70, shape[0], shape[1], dtype)
    outs = as_tuple(jax.jit(lambda x, *ws: kernels.dense(x, *ws, preferred_element_type=jnp.float32))(x, *ws))
    assert len(outs) == len(ws)
    for out, w in zip(outs, ws):
        want = jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32), precision="highest")
        assert out.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))
    assert as_tuple(jax.jit(kernels.dense)(x, *ws))[0].dtype == x.dtype  # default: x's dtype, as x @ w


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{'+'.join(map(str, s[1]))}")
def test_a_rows_result_does_not_depend_on_the_other_rows(shape, dtype):
    """Rows computed alone, in small groups and among 70 (other register tiles, other work items, other
    threads) are bit-identical: greedy outputs cannot depend on the batch."""
    rng = np.random.default_rng()
    x, ws = random_problem(rng, 70, shape[0], shape[1], dtype)
    run = jax.jit(kernels.dense)
    whole = as_tuple(run(x, *ws))
    for first, count in [(0, 1), (3, 1), (0, 2), (5, 7), (1, 33), (0, 64)]:
        for part, full in zip(as_tuple(run(x[first:first + count], *ws)), whole):
            np.testing.assert_array_equal(np.asarray(part), np.asarray(full[first:first + count]))
    sums = jax.jit(kernels.row_sum)(x)
    for first, count in [(0, 1), (5, 7), (0, 64)]:
        np.testing.assert_array_equal(np.asarray(jax.jit(kernels.row_sum)(x[first:first + count])),
                                      np.asarray(sums[first:first + count]))


@pytest.mark.parametrize("experts", [8, 60, 64])
def test_softmax_of_a_row_does_not_depend_on_the_other_rows(experts):
    """The router's softmax over 1, 7 or 32 rows and over 2048: bit-identical (the exp fused with the
    row max would round differently)."""
    x = jnp.asarray(np.random.default_rng().normal(size=(2048, experts)) * 3, jnp.float32)
    run = jax.jit(kernels.softmax)
    whole = np.asarray(run(x))
    for count in (1, 7, 32):
        np.testing.assert_array_equal(np.asarray(run(x[:count])), whole[:count])


def test_row_sum_and_softmax_match_jnp():
    rng = np.random.default_rng()
    x = jnp.asarray(rng.normal(size=(3, 5, 40)), jnp.float32)
    np.testing.assert_allclose(np.asarray(kernels.row_sum(x)), np.asarray(x.sum(-1, keepdims=True)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(kernels.softmax(x)), np.asarray(jax.nn.softmax(x, axis=-1)), rtol=1e-6,
                               atol=1e-7)


def test_for_gspmd_traces_xla_operations():
    """On CPU the native kernel by default; inside for_gspmd() XLA's dot and reduction, which GSPMD
    partitions (a custom call's operands it would gather whole)."""
    x, w = jnp.ones((4, 8)), jnp.ones((8, 3))

    def lowered():  # a new function each time: jax caches a function's trace, and the context is not in its key
        return jax.jit(lambda x, w: (kernels.dense(x, w), kernels.row_sum(x))).lower(x, w).as_text()
    assert lowered().count("custom_call @moejax_matmul") == 2
    with kernels.for_gspmd():
        text = lowered()
    assert "moejax_matmul" not in text and "dot_general" in text


def test_results_do_not_depend_on_how_many_threads_run_them(monkeypatch):
    """MOEJAX_NATIVE_PARALLEL_MIN (read at every call) moves work between the calling thread alone and the
    pool; the projection, routed-experts and paged-attention kernels give the same bits either way."""
    from moejax.kernels import native

    rng = np.random.default_rng()
    x, ws = random_problem(rng, 70, 128, [128, 64], "float32")
    slots = jnp.asarray(rng.integers(0, 9, (70, 4)), jnp.int32)
    routing = jnp.asarray(rng.random((70, 4)), jnp.float32)
    w_gate_up, w_down = (jnp.asarray(rng.normal(size=s) / 8, jnp.float32) for s in ((8, 128, 96), (8, 48, 128)))
    blocks, block_size = 40, 4
    k_cache, v_cache = (jnp.asarray(rng.normal(size=(blocks, block_size, 2, 32)), jnp.float32) for _ in range(2))
    q = jnp.asarray(rng.normal(size=(70, 4, 32)), jnp.float32)
    positions = jnp.asarray(rng.integers(0, 5 * block_size, 70), jnp.int32)
    seq_ids = jnp.asarray(rng.integers(0, 8, 70), jnp.int32)
    tables = jnp.asarray(rng.permutation(blocks)[:40].reshape(8, 5), jnp.int32)
    run = jax.jit(lambda: (native.matmul(x, *ws),
                           native.moe_ffn(x, slots, routing, w_gate_up, w_down, "silu", None)[0],
                           native.paged_attention(q, k_cache, v_cache, positions, seq_ids, tables, scale=0.2)))
    outputs = {}
    for threshold in ("1", str(1 << 40)):  # every call over the pool / every call on the caller alone
        monkeypatch.setenv("MOEJAX_NATIVE_PARALLEL_MIN", threshold)
        outputs[threshold] = jax.tree.leaves(run())
    for pooled, alone in zip(*outputs.values()):
        np.testing.assert_array_equal(np.asarray(pooled), np.asarray(alone))
