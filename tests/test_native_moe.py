"""The native CPU routed-experts kernel (kernels/native/moe_ffn.cc) against the reference backend on fresh
random inputs, the independence of a row's result from the rest of the batch, and when the CPU backend
runs it. (Against float64 numpy, through the CPU backend: test_kernels_backends.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.kernels import ClampedSwiGLU, native, reference
from moejax.kernels.cpu import backend as cpu_backend


def problem(rng, T, K, S, D, F, dtype, biased=False):
    """Random experts and routing; slot ids in [0, S], S reaching no slot (as moejax.kernels.slot_ids gives)."""
    x = jnp.asarray(rng.normal(size=(T, D)), dtype)
    slots = jnp.asarray(rng.integers(0, S + 1, (T, K)), jnp.int32)
    weights = jnp.asarray(rng.random((T, K)), jnp.float32)
    w_gate_up = jnp.asarray(rng.normal(size=(S, D, 2 * F)) * 3 / np.sqrt(D), dtype)
    w_down = jnp.asarray(rng.normal(size=(S, F, D)) / np.sqrt(F), dtype)
    bias = jnp.asarray(rng.normal(size=(S, 2 * F)), dtype) if biased else None
    return x, slots, weights, w_gate_up, w_down, bias


run_native = jax.jit(native.moe_ffn, static_argnums=5)
run_reference = jax.jit(reference.moe_ffn, static_argnums=5)


# (T, K, S, D, F): a decode row; odd sizes (no whole 8-lane vector: the scalar column tails); sizes on
# the 32-column register tiles with many rows per slot (whole 4-row items and remainders)
SHAPES = [(1, 4, 16, 128, 64), (13, 3, 5, 12, 10), (70, 4, 6, 64, 48)]
ACTIVATIONS = [("silu", False), ("gelu", True), (ClampedSwiGLU(), True)]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("activation,biased", ACTIVATIONS, ids=["silu", "gelu+bias", "clamped+bias"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_native_moe_ffn_matches_the_reference(shape, activation, biased, dtype):
    """Same outputs as the reference backend (ragged_dot): float32 to rounding, bfloat16 apart by the
    accumulation order only (both round the hidden activation to bf16); rows per slot exact."""
    rng = np.random.default_rng()
    x, slots, weights, w_gate_up, w_down, bias = problem(rng, *shape, dtype, biased)
    out, sizes = run_native(x, slots, weights, w_gate_up, w_down, activation, bias)
    want, want_sizes = run_reference(x, slots, weights, w_gate_up, w_down, activation, bias)
    assert out.dtype == jnp.float32 and out.shape == want.shape
    scale = float(jnp.abs(want).max())
    tol = 1e-5 if dtype == "float32" else 2e-2
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=tol, atol=tol * scale)
    np.testing.assert_array_equal(sizes, want_sizes)
    in_range = np.asarray(slots) < shape[2]
    np.testing.assert_array_equal(sizes, np.bincount(np.asarray(slots)[in_range], minlength=shape[2]))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_rows_result_does_not_depend_on_the_batch(dtype):
    """Greedy outputs must not depend on the batch: the first rows computed alone, and again among
    many rows sharing their experts (other register tiles, other work items), are bit-identical."""
    rng = np.random.default_rng()
    x, slots, weights, w_gate_up, w_down, _ = problem(rng, 53, 4, 6, 64, 48, dtype)
    whole, _ = run_native(x, slots, weights, w_gate_up, w_down, "silu", None)
    for n in (1, 3, 6):
        part, _ = run_native(x[:n], slots[:n], weights[:n], w_gate_up, w_down, "silu", None)
        np.testing.assert_array_equal(np.asarray(part), np.asarray(whole[:n]))
    order = rng.permutation(53)  # the same rows in another order
    shuffled, _ = run_native(x[order], slots[order], weights[order], w_gate_up, w_down, "silu", None)
    np.testing.assert_array_equal(np.asarray(shuffled), np.asarray(whole[order]))


def test_the_cpu_backend_runs_it_below_prefill_sizes_or_on_small_experts():
    """Decode and mixed batches take the native kernel; prefill-sized ones (>= PREFILL_ROWS rows per
    expert) the tile loop, whose dots XLA spreads over its threads, unless the experts are small enough
    for the loop's per-tile overhead to dominate; all agree."""
    from moejax.kernels import cpu
    rng = np.random.default_rng()
    S = 4
    prefill = cpu.PREFILL_ROWS * S // 2  # rows; with K = 2, PREFILL_ROWS rows per expert
    small, big = (32, 16), (512, 512)  # (D, F): 3 D F weights per expert
    assert 3 * 32 * 16 <= cpu.NATIVE_EXPERT_WEIGHTS < 3 * 512 * 512
    for T, (D, F), native_expected in [(16, big, True), (prefill, small, True), (prefill, big, False)]:
        x, slots, weights, w_gate_up, w_down, _ = problem(rng, T, 2, S, D, F, "float32")
        run = jax.jit(lambda *a: cpu_backend.moe_ffn(*a, "silu"))
        assert ("moejax_moe_ffn" in run.lower(x, slots, weights, w_gate_up, w_down).as_text()) == native_expected
        out, _ = run(x, slots, weights, w_gate_up, w_down)
        want, _ = run_reference(x, slots, weights, w_gate_up, w_down, "silu", None)
        np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))
