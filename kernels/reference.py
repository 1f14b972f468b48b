"""The ground-truth backend: `jax.lax.ragged_dot` with fp32 accumulation. Every other backend is
tested against this (and this against float64 numpy)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .permute import permute, sort_by_expert, unpermute_combine


def unsupported(D: int, F: int, dtype) -> None:
    """Runs every shape and dtype."""
    return None


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array,
                   row_start: jax.Array | int = 0) -> jax.Array:
    """x: [T, D] sorted by group, w: [E, D, F], group_sizes: [E] -> [T, F] in fp32.

    The groups' rows start at row `row_start`; rows outside them belong to no group and come out as
    zeros.
    """
    if isinstance(row_start, int) and row_start == 0:
        return jax.lax.ragged_dot(x, w, group_sizes.astype(jnp.int32), preferred_element_type=jnp.float32)
    # Rotate the groups to row 0: rows after them (including the wrapped-around rows that were
    # before them) are past sum(group_sizes), which ragged_dot leaves zero.
    y = grouped_matmul(jnp.roll(x, -row_start, axis=0), w, group_sizes)
    return jnp.roll(y, row_start, axis=0)


def expert_ffn(x_sorted: jax.Array, w_gate_up: jax.Array, w_down: jax.Array, group_sizes: jax.Array,
               activation: str = "silu", row_start: jax.Array | int = 0) -> jax.Array:
    """SwiGLU experts. x_sorted: [T, D], w_gate_up: [E, D, 2F] (gate | up), w_down: [E, F, D] -> [T, D] fp32."""
    gate_up = grouped_matmul(x_sorted, w_gate_up, group_sizes, row_start)  # [T, 2F]
    gate, up = jnp.split(gate_up, 2, axis=-1)
    h = (ACTIVATIONS[activation](gate) * up).astype(x_sorted.dtype)
    return grouped_matmul(h, w_down, group_sizes, row_start)


def moe_ffn(x: jax.Array, local_ids: jax.Array, topk_weights: jax.Array, w_gate_up: jax.Array,
            w_down: jax.Array, activation: str = "silu") -> tuple[jax.Array, jax.Array]:
    """x: [T, D], local_ids: [T, K] (E = no expert) -> ([T, D] fp32, group_sizes [E])."""
    order, group_sizes = sort_by_expert(local_ids, w_gate_up.shape[0])
    y_sorted = expert_ffn(permute(x, order, local_ids.shape[1]), w_gate_up, w_down, group_sizes,
                          activation)
    return unpermute_combine(y_sorted, order, topk_weights), group_sizes


ACTIVATIONS = {"silu": jax.nn.silu, "gelu": jax.nn.gelu}
