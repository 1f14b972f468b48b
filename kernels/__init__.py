"""moejax.kernels: the fused expert computation behind one entry point, and paged attention.

    route (in the model) -> moe_ffn: group rows by expert -> expert FFN (grouped GEMMs) -> combine

`moe_ffn` is what models call. Which implementation runs is decided here and only here:

    backend_for():   MOEJAX_KERNEL_BACKEND / use_backend(...) if set, else by platform:
                     cpu -> "cpu", tpu -> "pallas", gpu -> "mosaic_gpu" on Hopper (sm_90), else "reference"
    per call:        a backend that cannot run the shape or dtype (its `unsupported` says why) falls
                     back to "reference" when it was chosen by platform, and raises when it was
                     asked for by name.

Backends: "reference" (`jax.lax.ragged_dot`, the ground truth), "cpu" (a loop over active expert
tiles), "pallas" (BlockSpec kernels: compiled on TPU, interpreted elsewhere), "mosaic_gpu" (Hopper
warp-specialised TMA + wgmma kernels; GPU-interpreted elsewhere). See benchmarks/kernels.md.

Expert parallelism: `group_offset` says which experts a shard's weights hold -- w[:, ...] are
experts [group_offset, group_offset + E_local) -- and rows of other experts reach none of them.
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

from . import reference
from .paged_attention import paged_attention, write_kv
from .permute import permute, sort_by_expert, unpermute_combine


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


def _local_groups(group_sizes: jax.Array, group_offset, num_local: int):
    """group_sizes: [E] over all experts -> (sizes of the local experts [num_local], first row of
    the local experts' rows)."""
    group_sizes = jnp.asarray(group_sizes).astype(jnp.int32)
    if group_sizes.shape[0] < num_local:
        raise ValueError(f"group_sizes has {group_sizes.shape[0]} groups but the weights hold "
                         f"{num_local} experts")
    if isinstance(group_offset, int) and group_offset == 0 and group_sizes.shape[0] == num_local:
        return group_sizes, 0
    row_start = jnp.sum(jnp.where(jnp.arange(group_sizes.shape[0]) < group_offset, group_sizes, 0))
    return jax.lax.dynamic_slice_in_dim(group_sizes, group_offset, num_local), row_start


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array, *, group_offset=0,
                   backend: str | None = None) -> jax.Array:
    """x: [T, K] rows sorted by expert, w: [E_local, K, N], group_sizes: [E] (E >= E_local) -> [T, N] fp32.

    w holds experts [group_offset, group_offset + E_local); rows of other experts, and rows past
    sum(group_sizes), come out as zeros.
    """
    x, w = jnp.asarray(x), jnp.asarray(w)
    sizes, row_start = _local_groups(group_sizes, group_offset, w.shape[0])
    return _resolve(backend, w.shape[1], w.shape[2], x.dtype).grouped_matmul(x, w, sizes, row_start)


def expert_ffn(x_sorted, w_gate_up, w_down, group_sizes, activation: str = "silu", *,
               group_offset=0, backend: str | None = None):
    """SwiGLU experts on rows sorted by expert. x_sorted: [T, D], w_gate_up: [E_local, D, 2F]
    (gate | up), w_down: [E_local, F, D], group_sizes: [E] -> [T, D] fp32 (other rows: zeros)."""
    x_sorted, w_gate_up, w_down = map(jnp.asarray, (x_sorted, w_gate_up, w_down))
    _check_ffn_weights(x_sorted, w_gate_up, w_down, activation)
    sizes, row_start = _local_groups(group_sizes, group_offset, w_gate_up.shape[0])
    impl = _resolve(backend, x_sorted.shape[1], w_down.shape[1], x_sorted.dtype)
    return impl.expert_ffn(x_sorted, w_gate_up, w_down, sizes, activation, row_start)


def moe_ffn(x: jax.Array, topk_ids: jax.Array, topk_weights: jax.Array, w_gate_up: jax.Array,
            w_down: jax.Array, *, activation: str = "silu", backend: str | None = None,
            group_offset=0) -> tuple[jax.Array, jax.Array]:
    """Routed experts for tokens x: [T, D] with topk_ids/topk_weights: [T, K].

    w_gate_up: [E_local, D, 2F] and w_down: [E_local, F, D] hold experts [group_offset,
    group_offset + E_local); ids outside that range (e.g. the padding id E) reach no expert here.
    Returns ([T, D] in x.dtype: the weighted sum over this shard's experts, group_sizes
    [E_local]: rows each local expert received -- what executors report as activated experts).
    """
    x, topk_ids, topk_weights, w_gate_up, w_down = map(jnp.asarray, (x, topk_ids, topk_weights, w_gate_up, w_down))
    _check_ffn_weights(x, w_gate_up, w_down, activation)
    if topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != x.shape[0]:
        raise ValueError(f"topk_ids {topk_ids.shape} and topk_weights {topk_weights.shape} must both "
                         f"be [T, K] with T = {x.shape[0]} (rows of x)")
    num_local = w_gate_up.shape[0]
    local_ids = topk_ids.astype(jnp.int32) - group_offset
    local_ids = jnp.where((local_ids >= 0) & (local_ids < num_local), local_ids, num_local)
    impl = _resolve(backend, x.shape[1], w_down.shape[1], x.dtype)
    out, group_sizes = impl.moe_ffn(x, local_ids, topk_weights, w_gate_up, w_down, activation)
    return out.astype(x.dtype), group_sizes


def _check_ffn_weights(x, w_gate_up, w_down, activation):
    E, D, F = w_down.shape[0], x.shape[-1], w_down.shape[1]
    if w_gate_up.shape != (E, D, 2 * F) or w_down.shape != (E, F, D):
        raise ValueError(f"expert weights: w_gate_up {w_gate_up.shape} must be [E, D, 2F] and w_down "
                         f"{w_down.shape} [E, F, D] with D = {D} (x's last dim)")
    if activation not in reference.ACTIVATIONS:
        raise ValueError(f"activation {activation!r}: known {sorted(reference.ACTIVATIONS)}")


__all__ = ["BACKENDS", "backend_for", "platform_backend", "use_backend", "grouped_matmul",
           "expert_ffn", "moe_ffn", "sort_by_expert", "permute", "unpermute_combine",
           "paged_attention", "write_kv"]
