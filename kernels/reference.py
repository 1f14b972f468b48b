"""The ground-truth backend: `jax.lax.ragged_dot` with fp32 accumulation. Every other backend is
tested against this (and this against float64 numpy).

The expert FFN's gated activation (`glu`) is shared by every backend: act(gate) * up for a named
activation, or GPT-OSS's clamped SwiGLU (`ClampedSwiGLU`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from .permute import group_of_sorted_rows, permute, sort_by_expert, unpermute_combine


@dataclass(frozen=True)
class ClampedSwiGLU:
    """GPT-OSS's expert GLU: the gate clamped from above at `limit`, up to [-limit, limit], then
    (up + 1) * gate * sigmoid(alpha * gate). Frozen: it is static structure of the traced kernels."""

    alpha: float = 1.702
    limit: float = 7.0

    def __call__(self, gate: jax.Array, up: jax.Array) -> jax.Array:
        gate = jnp.minimum(gate, self.limit)
        up = jnp.clip(up, -self.limit, self.limit)
        return (up + 1) * (gate * jax.nn.sigmoid(self.alpha * gate))


ACTIVATIONS = {"silu": jax.nn.silu, "gelu": jax.nn.gelu}
Activation = str | ClampedSwiGLU  # a name in ACTIVATIONS (act(gate) * up) or a GLU object


def glu(activation: Activation) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """(gate, up) -> the hidden activation of a gated expert FFN."""
    if isinstance(activation, ClampedSwiGLU):
        return activation
    act = ACTIVATIONS[activation]
    return lambda gate, up: act(gate) * up


def unsupported(D: int, F: int, dtype) -> None:
    """Runs every shape and dtype."""
    return None


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """x: [T, D] sorted by group, w: [E, D, F], group_sizes: [E] -> [T, F] in fp32 (rows past
    sum(group_sizes) belong to no group: zeros)."""
    return jax.lax.ragged_dot(x, w, group_sizes.astype(jnp.int32), preferred_element_type=jnp.float32)


def expert_ffn(x_sorted: jax.Array, w_gate_up: jax.Array, w_down: jax.Array, group_sizes: jax.Array,
               activation: Activation = "silu", b_gate_up: jax.Array | None = None) -> jax.Array:
    """Gated experts. x_sorted: [T, D], w_gate_up: [E, D, 2F] (gate | up), w_down: [E, F, D],
    b_gate_up: [E, 2F] or None -> [T, D] fp32."""
    gate_up = grouped_matmul(x_sorted, w_gate_up, group_sizes)  # [T, 2F]
    if b_gate_up is not None:  # rows past the groups get some bias; the down GEMM zeroes them
        gate_up = gate_up + b_gate_up.astype(jnp.float32)[group_of_sorted_rows(group_sizes, x_sorted.shape[0])]
    gate, up = jnp.split(gate_up, 2, axis=-1)
    h = glu(activation)(gate, up).astype(x_sorted.dtype)
    return grouped_matmul(h, w_down, group_sizes)


def moe_ffn(x: jax.Array, slot_ids: jax.Array, topk_weights: jax.Array, w_gate_up: jax.Array,
            w_down: jax.Array, activation: Activation = "silu",
            b_gate_up: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """x: [T, D], slot_ids: [T, K] (S = no slot) -> ([T, D] fp32, rows per slot [S])."""
    order, group_sizes = sort_by_expert(slot_ids, w_gate_up.shape[0])
    y_sorted = expert_ffn(permute(x, order, slot_ids.shape[1]), w_gate_up, w_down, group_sizes,
                          activation, b_gate_up)
    return unpermute_combine(y_sorted, order, topk_weights), group_sizes
