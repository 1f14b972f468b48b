"""Every backend that runs on CPU against float64 numpy, on fresh random inputs.

pallas runs with interpret=True and mosaic_gpu in Pallas' GPU interpret mode; both interpreters
fill kernel outputs with NaN before the kernel runs (checked in test_kernels_tiles.py), so
"finite and equal to numpy everywhere" means every element was written.
"""

import numpy as np
import pytest

import jax.numpy as jnp
from moejax import kernels

TOL = {"float32": 1e-5, "bfloat16": 1e-2}  # relative to the output's largest magnitude
TILED = ["cpu", "pallas", "mosaic_gpu"]
ALL = ["reference", *TILED]


def runs(backend: str, dtype: str, D: int, F: int) -> bool:
    """mosaic_gpu (wgmma) takes bf16 with D, F multiples of 128; the rest take anything."""
    return backend != "mosaic_gpu" or (dtype == "bfloat16" and D % 128 == 0 and F % 128 == 0)


ACTIVATIONS = {"silu": lambda v: v / (1 + np.exp(-v)),  # gelu: jax.nn.gelu's tanh approximation
               "gelu": lambda v: 0.5 * v * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v**3)))}


def numpy_clamped_swiglu(gate, up, alpha=1.702, limit=7.0):
    """GPT-OSS's GLU as transformers writes it (gate clamped above, up both sides)."""
    gate, up = np.minimum(gate, limit), np.clip(up, -limit, limit)
    return (up + 1) * gate / (1 + np.exp(-alpha * gate))


def numpy_ffn_rows(x, w_gate_up, w_down, expert_of_row, activation="silu", b_gate_up=None, b_down=None):
    """float64 gated expert per row; expert_of_row[i] < 0: the row reaches no expert (zeros).
    activation: a name in ACTIVATIONS or "clamped_swiglu"; optional biases [E, 2F], [E, D]."""
    F = w_down.shape[1]
    glu = numpy_clamped_swiglu if activation == "clamped_swiglu" else \
        lambda gate, up: ACTIVATIONS[activation](gate) * up
    out = np.zeros((x.shape[0], w_down.shape[2]))
    for i, e in enumerate(expert_of_row):
        if e >= 0:
            gu = x[i] @ w_gate_up[e] + (0 if b_gate_up is None else b_gate_up[e])
            out[i] = glu(gu[:F], gu[F:]) @ w_down[e] + (0 if b_down is None else b_down[e])
    return out


def expert_of_sorted_rows(group_sizes, num_rows):
    """Expert of each row of a [num_rows]-row array sorted by expert, -1 for rows past the groups."""
    ids = np.repeat(np.arange(len(group_sizes)), group_sizes)
    return np.concatenate([ids, -np.ones(num_rows - len(ids), int)])


def random_weights(rng, E, D, F, dtype):
    w_gate_up = rng.normal(size=(E, D, 2 * F)) / np.sqrt(D)
    w_down = rng.normal(size=(E, F, D)) / np.sqrt(F)
    return [np.asarray(jnp.asarray(w, dtype), np.float64) for w in (w_gate_up, w_down)]


def as_jax(dtype, *arrays):
    return [jnp.asarray(a, dtype) for a in arrays]


def assert_close(got, want, dtype):
    got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
    assert np.isfinite(got).all(), f"{np.isnan(got).sum()} elements not written (NaN)"
    scale = max(np.abs(want).max(), 1e-30)
    np.testing.assert_allclose(got, want, rtol=TOL[dtype], atol=TOL[dtype] * scale)


# (group sizes, rows): uneven, with empty groups, all rows in one expert, rows past the groups,
# sizes that are no multiple of any block.
GROUPS = {
    "uneven": ([5, 0, 17, 1, 0, 0, 40, 3], 66),
    "one_expert": ([0, 0, 300, 0], 300),  # also the "prefill" shape class (>= 64 rows per expert)
    "trailing_rows": ([3, 9, 0, 2], 19),
    "wide": (None, 301),  # E = 256 experts, random sizes
}


def make_groups(name, rng):
    sizes, rows = GROUPS[name]
    if sizes is None:
        sizes = np.bincount(rng.integers(0, 256, rows - 13), minlength=256)
    return np.asarray(sizes), rows


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("groups", list(GROUPS))
@pytest.mark.parametrize("backend", ALL)
def test_expert_ffn(backend, groups, dtype):
    rng = np.random.default_rng([ALL.index(backend), list(GROUPS).index(groups), len(dtype)])
    sizes, rows = make_groups(groups, rng)
    D, F = (128, 128) if groups == "wide" else (128, 256)
    if groups == "wide" and backend == "mosaic_gpu":
        pytest.skip("256 experts in GPU interpret mode take ~15 s; covered at 64 experts by test_moe_ffn")
    if not runs(backend, dtype, D, F):
        pytest.skip("mosaic_gpu takes bf16 only")
    w_gate_up, w_down = random_weights(rng, len(sizes), D, F, dtype)
    x = np.asarray(jnp.asarray(rng.normal(size=(rows, D)), dtype), np.float64)
    want = numpy_ffn_rows(x, w_gate_up, w_down, expert_of_sorted_rows(sizes, rows))
    got = kernels.expert_ffn(*as_jax(dtype, x, w_gate_up, w_down), jnp.asarray(sizes), backend=backend)
    assert got.dtype == jnp.float32
    assert_close(got, want, dtype)


@pytest.mark.parametrize("backend", ALL)
def test_expert_ffn_gelu(backend):
    rng = np.random.default_rng(ALL.index(backend))
    sizes, rows, dtype = np.array([9, 0, 40, 3]), 55, "bfloat16"
    w_gate_up, w_down = random_weights(rng, 4, 128, 128, dtype)
    x = np.asarray(jnp.asarray(rng.normal(size=(rows, 128)), dtype), np.float64)
    want = numpy_ffn_rows(x, w_gate_up, w_down, expert_of_sorted_rows(sizes, rows), "gelu")
    got = kernels.expert_ffn(*as_jax(dtype, x, w_gate_up, w_down), jnp.asarray(sizes), "gelu", backend=backend)
    assert_close(got, want, dtype)


@pytest.mark.parametrize("D,F", [(96, 80), (128, 200)])  # F not a multiple of 128 (nor D)
@pytest.mark.parametrize("backend", ["reference", "cpu", "pallas"])
def test_expert_ffn_odd_dims(backend, D, F):
    rng = np.random.default_rng(D + F)
    sizes, rows = np.array([7, 0, 30, 12]), 52
    w_gate_up, w_down = random_weights(rng, 4, D, F, "float32")
    x = rng.normal(size=(rows, D)).astype(np.float32).astype(np.float64)
    want = numpy_ffn_rows(x, w_gate_up, w_down, expert_of_sorted_rows(sizes, rows))
    got = kernels.expert_ffn(*as_jax("float32", x, w_gate_up, w_down), jnp.asarray(sizes), backend=backend)
    assert_close(got, want, "float32")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("backend", ALL)
def test_grouped_matmul(backend, dtype):
    """Groups of uneven size, some empty, and rows past all groups (zeros)."""
    rng = np.random.default_rng(ALL.index(backend) + len(dtype))
    sizes, rows = np.array([4, 9, 0, 21, 6, 3, 2]), 50
    K, N = 128, 256
    if not runs(backend, dtype, K, N):
        pytest.skip("mosaic_gpu takes bf16 only")
    w = np.asarray(jnp.asarray(rng.normal(size=(len(sizes), K, N)) / np.sqrt(K), dtype), np.float64)
    x = np.asarray(jnp.asarray(rng.normal(size=(rows, K)), dtype), np.float64)
    experts = expert_of_sorted_rows(sizes, rows)
    want = np.stack([x[i] @ w[e] if e >= 0 else np.zeros(N) for i, e in enumerate(experts)])
    got = kernels.grouped_matmul(*as_jax(dtype, x, w), jnp.asarray(sizes), backend=backend)
    assert_close(got, want, dtype)


def numpy_moe(x, ids, weights, w_gate_up, w_down, slot_of=None, **ffn):
    """float64 routed experts of an expert buffer w_gate_up: [S, D, 2F] whose slot_of: [E] names each
    expert's slot or -1 (None: slot e holds expert e); ids outside [0, E) and experts of slot -1
    contribute nothing. ffn: activation and biases, as numpy_ffn_rows takes them."""
    S = w_gate_up.shape[0]
    slot_of = np.arange(S) if slot_of is None else np.asarray(slot_of)
    out = np.zeros((x.shape[0], w_down.shape[2]))
    for k in range(ids.shape[1]):
        in_range = (ids[:, k] >= 0) & (ids[:, k] < len(slot_of))
        slots = np.where(in_range, slot_of[np.clip(ids[:, k], 0, len(slot_of) - 1)], -1)
        out += weights[:, k:k + 1] * numpy_ffn_rows(x, w_gate_up, w_down, slots, **ffn)
    return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("T,E,K", [(1, 8, 2), (37, 64, 8), (130, 16, 4)])
@pytest.mark.parametrize("backend", ALL)
def test_moe_ffn(backend, T, E, K, dtype):
    """Top-k routing with padding rows (id E): decode-sized (T = 1), many experts, prefill-ish."""
    rng = np.random.default_rng([ALL.index(backend), T, E, K, len(dtype)])
    D, F = 128, 128
    if not runs(backend, dtype, D, F):
        pytest.skip("mosaic_gpu takes bf16 only")
    w_gate_up, w_down = random_weights(rng, E, D, F, dtype)
    x = np.asarray(jnp.asarray(rng.normal(size=(T, D)), dtype), np.float64)
    ids = np.argsort(rng.random((T, E)), axis=1)[:, :K].astype(np.int32)
    ids[T // 2] = E  # a padding row: routed nowhere
    weights = rng.random((T, K))
    want = numpy_moe(x, ids, weights, w_gate_up, w_down)
    out, group_sizes = kernels.moe_ffn(*as_jax(dtype, x), jnp.asarray(ids), jnp.asarray(weights, jnp.float32),
                                       *as_jax(dtype, w_gate_up, w_down), backend=backend)
    assert out.dtype == jnp.dtype(dtype)
    assert_close(out, want, dtype)
    np.testing.assert_array_equal(group_sizes, np.bincount(ids[ids < E], minlength=E))


@pytest.mark.parametrize("backend", ALL)
def test_moe_ffn_expert_buffer_through_slot_map(backend):
    """Buffers holding random subsets of the experts in random slot orders (an expert cache), some
    slots unused: each row's experts outside the buffer add nothing, and the rows per slot are
    exact. Then two shards holding 8 experts each sum to the whole layer (expert parallelism)."""
    rng = np.random.default_rng(ALL.index(backend))
    T, E, K, D, F, dtype = 29, 16, 4, 128, 128, "bfloat16"
    w_gate_up, w_down = random_weights(rng, E, D, F, dtype)
    x = np.asarray(jnp.asarray(rng.normal(size=(T, D)), dtype), np.float64)
    ids = np.argsort(rng.random((T, E)), axis=1)[:, :K].astype(np.int32)
    ids[3] = E  # a padding row
    weights = rng.random((T, K))

    def run(slot_of, buffer_gu, buffer_down):
        out, slot_sizes = kernels.moe_ffn(*as_jax(dtype, x), jnp.asarray(ids), jnp.asarray(weights, jnp.float32),
                                          *as_jax(dtype, buffer_gu, buffer_down), jnp.asarray(slot_of, jnp.int32),
                                          backend=backend)
        assert_close(out, numpy_moe(x, ids, weights, buffer_gu, buffer_down, slot_of), dtype)
        held = {e: s for e, s in enumerate(slot_of) if s >= 0}
        want_sizes = np.zeros(len(buffer_gu), int)
        for e in ids[ids < E]:
            if e in held:
                want_sizes[held[e]] += 1
        np.testing.assert_array_equal(slot_sizes, want_sizes)
        return np.asarray(out, np.float64)

    for num_slots, held in [(6, 5), (16, 16), (3, 3)]:
        experts = rng.choice(E, held, replace=False)
        slots = rng.choice(num_slots, held, replace=False)
        slot_of = np.full(E, -1)
        slot_of[experts] = slots
        buffer_gu = np.full((num_slots, D, 2 * F), 7.0)  # unused slots hold garbage that must not be read
        buffer_down = np.full((num_slots, F, D), 7.0)
        buffer_gu[slots], buffer_down[slots] = w_gate_up[experts], w_down[experts]
        run(slot_of, buffer_gu, buffer_down)

    total = 0
    for shard in range(2):
        slot_of = np.where(np.arange(E) // 8 == shard, np.arange(E) % 8, -1)
        total = total + run(slot_of, w_gate_up[8 * shard:8 * shard + 8], w_down[8 * shard:8 * shard + 8])
    assert_close(total, numpy_moe(x, ids, weights, w_gate_up, w_down), dtype)


def biased_experts(rng, E, D, F, dtype):
    """GPT-OSS-like experts: gate/up pre-activations spread well past the clamp (|v| > 7 for about
    a tenth to a quarter of them, so both clamps matter) and non-zero biases."""
    w_gate_up = rng.normal(size=(E, D, 2 * F)) * 6 / np.sqrt(D)
    w_down = rng.normal(size=(E, F, D)) / np.sqrt(F)
    b_gate_up, b_down = rng.normal(size=(E, 2 * F)), rng.normal(size=(E, D))
    return [np.asarray(jnp.asarray(w, dtype), np.float64) for w in (w_gate_up, w_down, b_gate_up, b_down)]


@pytest.mark.parametrize("backend,dtype", [(b, "bfloat16") for b in ALL] + [("reference", "float32"),
                                                                          ("cpu", "float32")])
def test_moe_ffn_biased_clamped_swiglu(backend, dtype):
    """GPT-OSS's experts: gate/up bias in the backend's fused epilogue, the down bias summed over
    each row's k experts, the clamped SwiGLU; through a slot map holding a subset of the experts
    (rows routed elsewhere take no bias either) and with a padding row."""
    D, F, E, T, K = 128, 128, 8, 45, 4
    rng = np.random.default_rng([ALL.index(backend), len(dtype), 7])
    w_gate_up, w_down, b_gate_up, b_down = biased_experts(rng, E, D, F, dtype)
    x = np.asarray(jnp.asarray(rng.normal(size=(T, D)), dtype), np.float64)
    ids = np.argsort(rng.random((T, E)), axis=1)[:, :K].astype(np.int32)
    ids[5] = E  # a padding row
    weights = rng.random((T, K))
    gate_up = np.einsum("td,edf->tef", x, w_gate_up) + b_gate_up
    assert (gate_up[..., :F] > 7).mean() > 0.05 and (np.abs(gate_up[..., F:]) > 7).mean() > 0.05
    slot_of = np.array([2, -1, 0, 4, -1, 1, 3, 5])  # experts 1 and 4 are not in the 6-slot buffer
    held = np.flatnonzero(slot_of >= 0)
    buffers = [np.full((6, *w.shape[1:]), 7.0) for w in (w_gate_up, w_down, b_gate_up, b_down)]
    for buffer, w in zip(buffers, (w_gate_up, w_down, b_gate_up, b_down)):
        buffer[slot_of[held]] = w[held]
    want = numpy_moe(x, ids, weights, buffers[0], buffers[1], slot_of, activation="clamped_swiglu",
                     b_gate_up=buffers[2], b_down=buffers[3])
    gu, down, b_gu, b_down_ = as_jax(dtype, *buffers)
    out, slot_sizes = kernels.moe_ffn(*as_jax(dtype, x), jnp.asarray(ids), jnp.asarray(weights, jnp.float32), gu,
                                      down, jnp.asarray(slot_of, jnp.int32), activation=kernels.ClampedSwiGLU(),
                                      b_gate_up=b_gu, b_down=b_down_, backend=backend)
    assert_close(out, want, dtype)
    np.testing.assert_array_equal(slot_sizes, np.bincount(slot_of[ids[(ids < E)]][slot_of[ids[ids < E]] >= 0],
                                                          minlength=6))


@pytest.mark.parametrize("backend", ["reference", "cpu", "pallas"])  # mosaic_gpu's epilogue: test_moe_ffn_biased...
def test_expert_ffn_biased_clamped_swiglu(backend):
    """Rows sorted by expert (uneven groups, an empty one, rows past the groups: zeros, no bias)."""
    rng = np.random.default_rng(ALL.index(backend) + 40)
    sizes, rows, dtype, D, F = np.array([9, 0, 40, 3]), 60, "bfloat16", 128, 256
    w_gate_up, w_down, b_gate_up, b_down = biased_experts(rng, 4, D, F, dtype)
    x = np.asarray(jnp.asarray(rng.normal(size=(rows, D)), dtype), np.float64)
    want = numpy_ffn_rows(x, w_gate_up, w_down, expert_of_sorted_rows(sizes, rows), "clamped_swiglu",
                          b_gate_up, b_down)
    got = kernels.expert_ffn(*as_jax(dtype, x, w_gate_up, w_down), jnp.asarray(sizes), kernels.ClampedSwiGLU(),
                             b_gate_up=jnp.asarray(b_gate_up, dtype), b_down=jnp.asarray(b_down, dtype),
                             backend=backend)
    assert_close(got, want, dtype)


def test_expert_bias_shapes_are_checked():
    x, w_gate_up, w_down = jnp.zeros((3, 16)), jnp.zeros((4, 16, 16)), jnp.zeros((4, 8, 16))
    ids, weights = jnp.zeros((3, 2), jnp.int32), jnp.ones((3, 2))
    with pytest.raises(ValueError, match=r"b_gate_up has shape \(4, 8\); expected \(4, 16\)"):
        kernels.moe_ffn(x, ids, weights, w_gate_up, w_down, b_gate_up=jnp.zeros((4, 8)))
    with pytest.raises(ValueError, match=r"b_down has shape \(16,\); expected \(4, 16\)"):
        kernels.moe_ffn(x, ids, weights, w_gate_up, w_down, b_down=jnp.zeros((16,)))
