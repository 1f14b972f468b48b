"""moejax.kernels: the fused expert computation behind one entry point, and paged attention.

    route (in the model) -> sort_by_expert -> permute -> expert_ffn (grouped GEMMs) -> unpermute_combine

`moe_ffn` is what models call. Which implementation runs is decided in one place, `backend_for`,
by platform; `use_backend` (or MOEJAX_KERNEL_BACKEND) overrides it.
"""

from __future__ import annotations

if __name__ == "kernels":  # the repo root is on sys.path: refuse to pose as a top-level package
    raise ImportError("moejax's kernels/ folder is importable only as moejax.kernels")


import contextlib
import os
from collections.abc import Iterator

import jax
import jax.numpy as jnp

from . import reference
from .paged_attention import paged_attention, write_kv
from .permute import permute, sort_by_expert, unpermute_combine

BACKENDS = {"reference": reference}
_override: list[str] = []


def backend_for(platform: str | None = None) -> str:
    """The backend name for a platform (default: JAX's default backend), honouring overrides."""
    if _override:
        return _override[-1]
    env = os.environ.get("MOEJAX_KERNEL_BACKEND")
    if env:
        if env not in BACKENDS:
            raise ValueError(f"MOEJAX_KERNEL_BACKEND={env!r}: unknown backend; known: {sorted(BACKENDS)}")
        return env
    return "reference"


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


def grouped_matmul(x, w, group_sizes, *, backend: str | None = None):
    return BACKENDS[backend or backend_for()].grouped_matmul(x, w, group_sizes)


def expert_ffn(x_sorted, w_gate_up, w_down, group_sizes, activation: str = "silu", *,
               backend: str | None = None):
    return BACKENDS[backend or backend_for()].expert_ffn(x_sorted, w_gate_up, w_down, group_sizes, activation)


def moe_ffn(x: jax.Array, topk_ids: jax.Array, topk_weights: jax.Array, w_gate_up: jax.Array,
            w_down: jax.Array, *, activation: str = "silu", backend: str | None = None) -> jax.Array:
    """Routed experts for tokens x: [T, D] with topk_ids/topk_weights: [T, K] (id E = padding row).

    Returns ([T, D] in x.dtype, group_sizes [E]); group_sizes counts the rows each expert received,
    which is what the executors report as activated experts.
    """
    num_experts, top_k = w_gate_up.shape[0], topk_ids.shape[1]
    order, group_sizes = sort_by_expert(topk_ids, num_experts)
    y_sorted = expert_ffn(permute(x, order, top_k), w_gate_up, w_down, group_sizes, activation,
                          backend=backend)
    out = unpermute_combine(y_sorted, order, topk_weights)
    return out.astype(x.dtype), group_sizes


__all__ = ["BACKENDS", "backend_for", "use_backend", "grouped_matmul", "expert_ffn", "moe_ffn",
           "sort_by_expert", "permute", "unpermute_combine", "paged_attention", "write_kv"]
