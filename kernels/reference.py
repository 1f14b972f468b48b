"""The ground-truth backend: `jax.lax.ragged_dot` with fp32 accumulation. Every other backend is
tested against this (and this against float64 numpy)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """x: [T, D] sorted by group, w: [E, D, F], group_sizes: [E] -> [T, F] in fp32.

    Rows past sum(group_sizes) belong to no group and come out as zeros.
    """
    return jax.lax.ragged_dot(x, w, group_sizes.astype(jnp.int32), preferred_element_type=jnp.float32)


def expert_ffn(x_sorted: jax.Array, w_gate_up: jax.Array, w_down: jax.Array, group_sizes: jax.Array,
               activation: str = "silu") -> jax.Array:
    """SwiGLU experts. x_sorted: [T, D], w_gate_up: [E, D, 2F] (gate | up), w_down: [E, F, D] -> [T, D] fp32."""
    gate_up = grouped_matmul(x_sorted, w_gate_up, group_sizes)  # [T, 2F]
    gate, up = jnp.split(gate_up, 2, axis=-1)
    h = (ACTIVATIONS[activation](gate) * up).astype(x_sorted.dtype)
    return grouped_matmul(h, w_down, group_sizes)


ACTIVATIONS = {"silu": jax.nn.silu, "gelu": jax.nn.gelu}
