"""moejax.kernels: the fused expert computation behind one entry point, and paged attention (over
per-head K/V, or over MLA's latent cache).

    route (in the model) -> moe_ffn: group rows by expert -> expert FFN (grouped GEMMs) -> combine

`moe_ffn` is what models call. Which implementation runs is decided here and only here:

    backend_for():   MOEJAX_KERNEL_BACKEND / use_backend(...) if set, else by platform:
                     cpu -> "cpu", tpu -> "pallas", gpu -> "mosaic_gpu" on Hopper (sm_90), else "reference"
    per call:        a backend that cannot run the shape or dtype (its `unsupported` says why) falls
                     back to "reference" when it was chosen by platform, and raises when it was
                     asked for by name.

Backends: "reference" (`jax.lax.ragged_dot`, the ground truth), "cpu" (a native XLA:CPU kernel at
decode sizes, native.py; a loop over active expert tiles above them), "pallas" (BlockSpec kernels: compiled on TPU, interpreted elsewhere), "mosaic_gpu" (Hopper
warp-specialised TMA + wgmma kernels; GPU-interpreted elsewhere). See benchmarks/kernels.md.

Rows computed alone: `dense(x, w)` is x @ w for the models' projections, router and LM head, `row_sum`
and `softmax` the sums over a row's features (norms, router). XLA:CPU's dots and reductions round a row
differently depending on how many rows share the operation, so a request's greedy tokens could depend on
the batch it runs in; on XLA:CPU these run the native dense kernel (native.py), which computes every row
alone. Elsewhere, and inside `for_gspmd()` (what a model under a sharded placement traces in: GSPMD
partitions a dot, while a custom call's operands it would gather whole), XLA's dot and reductions.

Expert buffers: `moe_ffn` computes with the experts of a buffer of S slots (w_gate_up: [S, D, 2F])
and a slot map `slot_of: [E]` naming each expert's slot, or -1 where the buffer does not hold it.
All experts in order (colocated), a shard's range (expert parallelism), an expert cache holding any
subset in any order (offload): one kernel call. Rows routed to an expert the buffer does not hold reach
none of its slots, like padding rows; the backends only ever see slot ids.
"""

from __future__ import annotations

if __name__ == "kernels":  # the repo root is on sys.path: refuse to pose as a top-level package
    raise ImportError("moejax's kernels/ folder is importable only as moejax.kernels")

import contextlib
import importlib
import os
from collections.abc import Iterator, Mapping

import jax
import jax.numpy as jnp

from . import native, reference
from .latent_attention import paged_latent_attention
from .paged_attention import paged_attention, write_kv, write_rows
from .permute import group_of_sorted_rows, permute, sort_by_expert, unpermute_combine
from .reference import ClampedSwiGLU


class _Backends(Mapping):
    """name -> backend, importing a backend's module on first use (the Pallas TPU and Mosaic GPU
    modules cost ~0.7 s to import; a CPU run never needs them)."""

    NAMES = ("reference", "cpu", "pallas", "mosaic_gpu")

    def __getitem__(self, name: str):
        if name not in self.NAMES:
            raise KeyError(name)
        module = importlib.import_module(f"{__name__}.{name}")
        return getattr(module, "backend", module)  # reference: the module is the backend

    def __iter__(self):
        return iter(self.NAMES)

    def __len__(self) -> int:
        return len(self.NAMES)


BACKENDS = _Backends()
_override: list[str] = []


def platform_backend(platform: str | None = None) -> str:
    """The backend a platform gets by default (platform: default JAX backend's, e.g. "cpu")."""
    platform = platform or jax.default_backend()
    if platform == "gpu":
        hopper = getattr(jax.devices("gpu")[0], "compute_capability", "").startswith("9.")
        return "mosaic_gpu" if hopper else "reference"
    return {"cpu": "cpu", "tpu": "pallas"}.get(platform, "reference")


def _requested() -> str | None:
    if _override:
        return _override[-1]
    env = os.environ.get("MOEJAX_KERNEL_BACKEND")
    if env and env not in BACKENDS:
        raise ValueError(f"MOEJAX_KERNEL_BACKEND={env!r}: unknown backend; known: {sorted(BACKENDS)}")
    return env or None


def backend_for(platform: str | None = None) -> str:
    """The backend name for a platform (default: JAX's default backend), honouring overrides."""
    return _requested() or platform_backend(platform)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the enclosed (traced) code with a given kernel backend. Affects tracing, so jit caches
    keyed on the backend name must include it (models pass it as a static argument)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; known: {sorted(BACKENDS)}")
    _override.append(name)
    try:
        yield
    finally:
        _override.pop()


_for_gspmd: list[bool] = []


@contextlib.contextmanager
def for_gspmd() -> Iterator[None]:
    """Trace the enclosed code for GSPMD to partition: `dense`, `row_sum` and `softmax` as XLA's own dot
    and reductions (module docstring)."""
    _for_gspmd.append(True)
    try:
        yield
    finally:
        _for_gspmd.pop()


def _native_dense(x: jax.Array, weights: tuple[jax.Array, ...]) -> bool:
    """Whether dense(x, *weights) runs the native kernel (static: shapes, dtypes, platform, context)."""
    return (not _for_gspmd and all(w.dtype == x.dtype and w.ndim == 2 for w in weights)
            and x.dtype in (jnp.float32, jnp.bfloat16) and backend_for() == "cpu"
            and jax.default_backend() == "cpu" and native.available())


def dense(x: jax.Array, *weights: jax.Array, preferred_element_type=None):
    """x: [..., K] @ w: [K, N] for each weight -> [..., N] in preferred_element_type (default x's dtype): one
    array for one weight, a tuple for several (one kernel call on CPU). On XLA:CPU each row's result is
    independent of the other rows (the native kernel; module docstring)."""
    x, weights = jnp.asarray(x), tuple(map(jnp.asarray, weights))
    if _native_dense(x, weights):
        out_dtype = preferred_element_type or x.dtype
        outs = tuple(out.reshape(*x.shape[:-1], -1).astype(out_dtype)
                     for out in native.matmul(x.reshape(-1, x.shape[-1]), *weights))
    else:
        outs = tuple(jnp.matmul(x, w, preferred_element_type=preferred_element_type) for w in weights)
    return outs[0] if len(outs) == 1 else outs


def row_sum(x: jax.Array) -> jax.Array:
    """x: [..., D] -> [..., 1] float32, the sum over the last axis. On XLA:CPU each row's sum is the same
    ascending chain of adds whatever the other rows (the dense kernel against ones; XLA's reduction
    rounds a row differently depending on how many rows it reduces); elsewhere jnp.sum."""
    x = jnp.asarray(x, jnp.float32)
    ones = jnp.ones((x.shape[-1], 1), jnp.float32)
    return dense(x, ones) if _native_dense(x, (ones,)) else jnp.sum(x, axis=-1, keepdims=True)


def softmax(x: jax.Array) -> jax.Array:
    """jax.nn.softmax over the last axis (float32), its denominator a row_sum."""
    # The max kept out of the exp's fusion: XLA:CPU's exp fused into the row-max reduction rounds a
    # row differently depending on how many rows there are.
    row_max = jax.lax.optimization_barrier(jax.lax.stop_gradient(x.max(axis=-1, keepdims=True)))
    unnormalized = jnp.exp(x - row_max)
    return unnormalized / row_sum(unnormalized)


def _native_top_k(x: jax.Array, k: int) -> bool:
    """Whether top_k / argmax of x run the native kernel (static: shape, dtype, platform, context)."""
    return (not _for_gspmd and x.dtype == jnp.float32 and x.ndim > 0 and 1 <= k <= x.shape[-1]
            and backend_for() == "cpu" and jax.default_backend() == "cpu" and native.available())


def top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """jax.lax.top_k over the last axis: (values, indices int32) of the k largest, equal ones in index
    order. On XLA:CPU for float32 the native kernel (faster than XLA's TopK library call at decode
    sizes); elsewhere, and inside `for_gspmd()`, lax.top_k."""
    x = jnp.asarray(x)
    if not _native_top_k(x, k):
        return jax.lax.top_k(x, k)
    values, indices = native.top_k(x.reshape(-1, x.shape[-1]), k)
    return values.reshape(*x.shape[:-1], k), indices.reshape(*x.shape[:-1], k)


def argmax(x: jax.Array) -> jax.Array:
    """jnp.argmax over the last axis, int32 (the first NaN, else the first of the largest). On XLA:CPU for
    float32 the native top-k kernel in argmax order (faster than XLA's argmax reduction);
    elsewhere, and inside `for_gspmd()`, jnp.argmax."""
    x = jnp.asarray(x)
    if not _native_top_k(x, 1):
        return jnp.argmax(x, axis=-1).astype(jnp.int32)
    return native.top_k(x.reshape(-1, x.shape[-1]), 1, argmax=True)[1].reshape(x.shape[:-1])


def _resolve(backend: str | None, K: int, N: int, dtype):
    """The backend module/object to run a problem with contraction/output dims (K, N)."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; known: {sorted(BACKENDS)}")
    requested = backend or _requested()
    name = requested or platform_backend()
    reason = BACKENDS[name].unsupported(K, N, jnp.dtype(dtype))
    if reason is None:
        return BACKENDS[name]
    if requested:
        raise ValueError(f"kernel backend {name!r} cannot run this problem: {reason}")
    return reference


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array, *, backend: str | None = None) -> jax.Array:
    """x: [T, K] rows sorted by group, w: [G, K, N], group_sizes: [G] -> [T, N] fp32; rows past
    sum(group_sizes) come out as zeros."""
    x, w = jnp.asarray(x), jnp.asarray(w)
    _check_groups(group_sizes, w.shape[0])
    return _resolve(backend, w.shape[1], w.shape[2], x.dtype).grouped_matmul(x, w, jnp.asarray(group_sizes, jnp.int32))


def expert_ffn(x_sorted, w_gate_up, w_down, group_sizes, activation: "reference.Activation" = "silu", *,
               b_gate_up=None, b_down=None, backend: str | None = None):
    """Gated experts on rows sorted by expert. x_sorted: [T, D], w_gate_up: [G, D, 2F]
    (gate | up), w_down: [G, F, D], group_sizes: [G], optional biases b_gate_up: [G, 2F] and
    b_down: [G, D] -> [T, D] fp32 (rows past the groups: zeros). activation: "silu", "gelu" or a
    `ClampedSwiGLU`."""
    x_sorted, w_gate_up, w_down = map(jnp.asarray, (x_sorted, w_gate_up, w_down))
    _check_ffn_weights(x_sorted, w_gate_up, w_down, activation, b_gate_up, b_down)
    _check_groups(group_sizes, w_gate_up.shape[0])
    group_sizes = jnp.asarray(group_sizes, jnp.int32)
    impl = _resolve(backend, x_sorted.shape[1], w_down.shape[1], x_sorted.dtype)
    out = impl.expert_ffn(x_sorted, w_gate_up, w_down, group_sizes, activation,
                          None if b_gate_up is None else jnp.asarray(b_gate_up))
    if b_down is None:
        return out
    rows = jnp.arange(x_sorted.shape[0])
    group = group_of_sorted_rows(group_sizes, x_sorted.shape[0])
    return out + jnp.where((rows < group_sizes.sum())[:, None], jnp.asarray(b_down, jnp.float32)[group], 0.0)


def slot_ids(topk_ids: jax.Array, slot_of: jax.Array | None, num_slots: int) -> jax.Array:
    """Expert ids [T, K] -> slot ids [T, K] in a buffer of num_slots slots; num_slots where the row
    reaches no slot (an id outside [0, E), i.e. padding, or an expert the buffer does not hold)."""
    ids = topk_ids.astype(jnp.int32)
    if slot_of is None:  # the buffer holds every expert, in order
        return jnp.where((ids >= 0) & (ids < num_slots), ids, num_slots)
    E = slot_of.shape[0]
    slots = jnp.where((ids >= 0) & (ids < E), jnp.asarray(slot_of, jnp.int32)[jnp.clip(ids, 0, E - 1)], -1)
    return jnp.where((slots >= 0) & (slots < num_slots), slots, num_slots)


def moe_ffn(x: jax.Array, topk_ids: jax.Array, topk_weights: jax.Array, w_gate_up: jax.Array,
            w_down: jax.Array, slot_of: jax.Array | None = None, *, activation: "reference.Activation" = "silu",
            b_gate_up: jax.Array | None = None, b_down: jax.Array | None = None,
            backend: str | None = None) -> tuple[jax.Array, jax.Array]:
    """Routed experts for tokens x: [T, D] with topk_ids/topk_weights: [T, K].

    w_gate_up: [S, D, 2F] and w_down: [S, F, D] are a buffer of S expert slots; slot_of: [E] int
    maps each expert to its slot or -1 (None: slot e holds expert e). Rows routed to ids outside
    [0, E) (the padding id E) or to experts the buffer does not hold reach no slot.
    Biased experts (GPT-OSS) also give b_gate_up: [S, 2F], added in the backend's fused gate/up
    epilogue, and b_down: [S, D], summed here for every backend (sum_k w_k * b_down[slot_k]).
    Returns ([T, D] in x.dtype: the weighted sum over the buffer's experts, rows per slot [S]).
    """
    x, topk_ids, topk_weights, w_gate_up, w_down = map(jnp.asarray, (x, topk_ids, topk_weights, w_gate_up, w_down))
    _check_ffn_weights(x, w_gate_up, w_down, activation, b_gate_up, b_down)
    if topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != x.shape[0]:
        raise ValueError(f"topk_ids {topk_ids.shape} and topk_weights {topk_weights.shape} must both "
                         f"be [T, K] with T = {x.shape[0]} (rows of x)")
    if slot_of is not None and jnp.ndim(slot_of) != 1:
        raise ValueError(f"slot_of must be [E] (a slot per expert), got shape {jnp.shape(slot_of)}")
    num_slots = w_gate_up.shape[0]
    slots = slot_ids(topk_ids, slot_of, num_slots)
    impl = _resolve(backend, x.shape[1], w_down.shape[1], x.dtype)
    out, slot_sizes = impl.moe_ffn(x, slots, topk_weights, w_gate_up, w_down, activation,
                                   None if b_gate_up is None else jnp.asarray(b_gate_up))
    if b_down is not None:  # rows reaching no slot (index S) take the fill value 0
        bias = jnp.take(jnp.asarray(b_down, jnp.float32), slots, axis=0, mode="fill", fill_value=0)  # [T, K, D]
        out = out + jnp.einsum("tkd,tk->td", bias, topk_weights.astype(jnp.float32))
    return out.astype(x.dtype), slot_sizes


def _check_groups(group_sizes, num_groups: int) -> None:
    if jnp.shape(group_sizes) != (num_groups,):
        raise ValueError(f"group_sizes has shape {jnp.shape(group_sizes)}; the weights hold {num_groups} groups")


def _check_ffn_weights(x, w_gate_up, w_down, activation, b_gate_up=None, b_down=None):
    E, D, F = w_down.shape[0], x.shape[-1], w_down.shape[1]
    if w_gate_up.shape != (E, D, 2 * F) or w_down.shape != (E, F, D):
        raise ValueError(f"expert weights: w_gate_up {w_gate_up.shape} must be [E, D, 2F] and w_down "
                         f"{w_down.shape} [E, F, D] with D = {D} (x's last dim)")
    for name, bias, want in (("b_gate_up", b_gate_up, (E, 2 * F)), ("b_down", b_down, (E, D))):
        if bias is not None and jnp.shape(bias) != want:
            raise ValueError(f"expert bias {name} has shape {jnp.shape(bias)}; expected {want} "
                             f"(E = {E} slots, F = {F}, D = {D})")
    if not isinstance(activation, reference.ClampedSwiGLU) and activation not in reference.ACTIVATIONS:
        raise ValueError(f"activation {activation!r}: known {sorted(reference.ACTIVATIONS)} or a ClampedSwiGLU")


__all__ = ["BACKENDS", "ClampedSwiGLU", "backend_for", "platform_backend", "use_backend", "dense", "row_sum",
           "softmax", "top_k", "argmax", "for_gspmd", "grouped_matmul", "expert_ffn", "moe_ffn", "slot_ids", "sort_by_expert", "permute",
           "unpermute_combine", "paged_attention", "paged_latent_attention", "write_kv", "write_rows"]
