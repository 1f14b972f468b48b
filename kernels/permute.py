"""Token permutation for expert computation: sort (token, slot) pairs by expert and scatter back.

No dense [T, E] tensor is formed: a stable argsort of the flat expert ids gives the order, a bincount
gives the group sizes. Rows routed to the sentinel expert id E (padding rows) sort last and belong to
no group, so grouped GEMMs skip them and the combine step never reads them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sort_by_expert(topk_ids: jax.Array, num_experts: int) -> tuple[jax.Array, jax.Array]:
    """topk_ids: [T, K] int (E marks a padding row) -> (order [T*K], group_sizes [E] int32).

    order[i] is the flat (token * K + slot) index of the i-th row in expert-sorted order.
    """
    flat = topk_ids.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    group_sizes = jnp.zeros((num_experts,), jnp.int32).at[flat].add(1, mode="drop")
    return order, group_sizes


def permute(x: jax.Array, order: jax.Array, top_k: int) -> jax.Array:
    """x: [T, D] -> x_sorted: [T*K, D], row i = x[order[i] // K]."""
    return jnp.take(x, order // top_k, axis=0)


def unpermute_combine(y_sorted: jax.Array, order: jax.Array, topk_weights: jax.Array) -> jax.Array:
    """y_sorted: [T*K, D] expert outputs in sorted order -> [T, D] = sum_k w[t, k] * y[t, k] (fp32 sum)."""
    T, K = topk_weights.shape
    y = jnp.zeros((T * K, y_sorted.shape[-1]), y_sorted.dtype).at[order].set(y_sorted)
    y = y.reshape(T, K, -1).astype(jnp.float32)
    return jnp.einsum("tkd,tk->td", y, topk_weights.astype(jnp.float32))


def group_of_sorted_rows(group_sizes: jax.Array, num_rows: int) -> jax.Array:
    """The group of each row of a [num_rows]-row array sorted by group -> [num_rows] int32; rows past
    sum(group_sizes) get the last group (callers mask them)."""
    ends = jnp.cumsum(group_sizes)
    rank = jnp.arange(num_rows, dtype=jnp.int32)
    return jnp.minimum(jnp.searchsorted(ends, rank, side="right"), group_sizes.shape[0] - 1).astype(jnp.int32)
