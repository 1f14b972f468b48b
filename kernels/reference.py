"""The ground-truth backend: `jax.lax.ragged_dot` with fp32 accumulation. Every other backend is
tested against this (and this against float64 numpy)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .permute import permute, sort_by_expert, unpermute_combine


def unsupported(D: int, F: int, dtype) -> None:
    """Runs every shape and dtype."""
    return None


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """x: [T, D] sorted by group, w: [E, D, F], group_sizes: [E] -> [T, F] in fp32 (rows past
    sum(group_sizes) belong to no group: zeros)."""
    return jax.lax.ragged_dot(x, w, group_sizes.astype(jnp.int32), preferred_element_type=jnp.float32)


def expert_ffn(x_sorted: jax.Array, w_gate_up: jax.Array, w_down: jax.Array, group_sizes: jax.Array,
               activation: str = "silu") -> jax.Array:
    """SwiGLU experts. x_sorted: [T, D], w_gate_up: [E, D, 2F] (gate | up), w_down: [E, F, D] -> [T, D] fp32."""
    gate_up = grouped_matmul(x_sorted, w_gate_up, group_sizes)  # [T, 2F]
    gate, up = jnp.split(gate_up, 2, axis=-1)
    h = (ACTIVATIONS[activation](gate) * up).astype(x_sorted.dtype)
    return grouped_matmul(h, w_down, group_sizes)


def moe_ffn(x: jax.Array, slot_ids: jax.Array, topk_weights: jax.Array, w_gate_up: jax.Array,
            w_down: jax.Array, activation: str = "silu") -> tuple[jax.Array, jax.Array]:
    """x: [T, D], slot_ids: [T, K] (S = no slot) -> ([T, D] fp32, rows per slot [S])."""
    order, group_sizes = sort_by_expert(slot_ids, w_gate_up.shape[0])
    y_sorted = expert_ffn(permute(x, order, slot_ids.shape[1]), w_gate_up, w_down, group_sizes,
                          activation)
    return unpermute_combine(y_sorted, order, topk_weights), group_sizes


ACTIVATIONS = {"silu": jax.nn.silu, "gelu": jax.nn.gelu}
