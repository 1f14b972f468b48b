"""The two model operations that run per shard under a placement.

attention   rows and KV blocks are split by request (`batch`), heads by `q_heads`/`kv_heads`. Each
            shard writes and reads only its own blocks: block tables hold global block ids, a shard
            subtracts the first id of its range. No communication. (`paged`: any attention whose
            caches and inputs name their logical axes, e.g. MLA's latent cache, kept whole per
            head shard.)

experts     rows split by `batch`, expert slots by `expert`. Where the two share mesh axes (DP-attention
            + EP over the same devices) a shard gathers the rows of its expert group, computes the
            slots it holds for all of them, and a reduce-scatter returns each row's sum to its owner;
            over expert axes that do not split rows, a psum adds the partial sums. A shard holding slots
            [first, first + S_local) of the buffer sees the slot map shifted to its range: rows routed
            to experts held elsewhere reach none of its slots, exactly like padding rows. (On platforms
            with `ragged_all_to_all` an all-to-all dispatch would move fewer bytes; this gather /
            reduce-scatter form runs everywhere, CPU included.)
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from .placement import Placement, local


def _linear_index(axes: tuple[str, ...]) -> jax.Array:
    return jax.lax.axis_index(axes) if axes else jnp.int32(0)


def attention(placement: Placement | None, attend: Callable, q, k, v, k_cache, v_cache, positions, slot_mapping,
              seq_ids, block_tables, num_kv_blocks, *head_params):
    """attend(q, k, v, k_cache, v_cache, positions, slot_mapping, seq_ids, block_tables, num_kv_blocks,
    *head_params) -> (out, k_cache, v_cache), run per (request shard, head shard); head_params: [H]
    per-query-head parameters (attention sinks), split with the heads."""
    n = len(head_params)

    def attend_paged(q, k, v, *rest):  # rest: head_params, caches, meta -> attend's order
        return attend(q, k, v, *rest[n:], *rest[:n])

    rows, heads, kv = ("batch", "q_heads", None), ("batch", "kv_heads", None), ("batch", None, "kv_heads", None)
    return paged(placement, attend_paged, (q, k, v, *head_params), (rows, heads, heads, *[("q_heads",)] * n),
                 (k_cache, v_cache), (kv, kv), rows, (positions, slot_mapping, seq_ids, block_tables, num_kv_blocks))


def paged(placement: Placement | None, attend: Callable, inputs: tuple, in_axes: tuple, caches: tuple,
          cache_axes: tuple, out_axes: tuple, meta: tuple):
    """Any attention over paged caches, run per (request shard, head shard):
    attend(*inputs, *caches, positions, slot_mapping, seq_ids, block_tables, num_kv_blocks) -> (out, *caches),
    inputs / caches / out split by their logical axes (rows and cache blocks over `batch`).
    meta: (positions, slot_mapping, seq_ids, block_tables, num_kv_blocks) with global block ids."""
    if placement is None or placement.mesh.size == 1:
        return attend(*inputs, *caches, *meta)
    batch_axes = placement.axes("batch")
    n_in, n_caches = len(inputs), len(caches)

    def per_shard(*args):
        inputs, caches = args[:n_in], args[n_in:n_in + n_caches]
        positions, slot_mapping, seq_ids, block_tables, num_kv_blocks = args[n_in + n_caches:]
        nb, bs = caches[0].shape[:2]
        first = _linear_index(batch_axes) * nb  # global id of this shard's first block
        local_tables = jnp.clip(block_tables - first, 0, nb - 1)  # other shards' tables: never read
        return attend(*inputs, *caches, positions, slot_mapping - first * bs, seq_ids, local_tables, num_kv_blocks)

    meta_axes = (("batch",), ("batch",), ("batch",), (None, None), None)
    return local(per_shard, in_axes=(*in_axes, *cache_axes, *meta_axes), out_axes=(out_axes, *cache_axes),
                 placement=placement)(*inputs, *caches, *meta)


def experts(placement: Placement | None, moe: Callable, x, ids, weights, w_gate_up, w_down, slot_of, *biases):
    """moe(x, ids, weights, w_gate_up, w_down, slot_of, *biases) -> out [T, D], run with the buffer's slots
    split over `expert` and rows over `batch` -> out [T, D]. slot_of: [E] slot of each expert (-1: not in
    the buffer; None: slot e holds expert e); ids outside [0, E) reach no slot. biases: per-slot arrays
    [S, ...] (biased experts' b_gate_up, b_down), split with the slots."""
    if placement is None or placement.shards("expert") == 1 and placement.shards("batch") == 1:
        return moe(x, ids, weights, w_gate_up, w_down, slot_of, *biases)
    if slot_of is None:  # the buffer holds every expert in order; each shard shifts the map to its slots
        slot_of = jnp.arange(w_gate_up.shape[0], dtype=jnp.int32)
    batch_axes, expert_axes = placement.axes("batch"), placement.axes("expert")
    shared = tuple(a for a in batch_axes if a in expert_axes)  # axes splitting both rows and experts
    expert_only = tuple(a for a in expert_axes if a not in shared)

    def per_shard(x, ids, weights, w_gate_up, w_down, slot_of, *biases):
        if shared:  # gather the rows of this expert group
            x, ids, weights = (jax.lax.all_gather(a, shared, tiled=True) for a in (x, ids, weights))
        first = _linear_index(expert_axes) * w_gate_up.shape[0]  # this shard's first slot
        local_slot = jnp.where((slot_of >= first) & (slot_of < first + w_gate_up.shape[0]), slot_of - first, -1)
        out = moe(x, ids, weights, w_gate_up, w_down, local_slot, *biases).astype(jnp.float32)
        if shared:
            out = jax.lax.psum_scatter(out, shared, scatter_dimension=0, tiled=True)
        if expert_only:
            out = jax.lax.psum(out, expert_only)
        return out.astype(x.dtype)

    return local(per_shard,
                 in_axes=(("batch", None), ("batch", None), ("batch", None), ("expert", None, None),
                          ("expert", None, None), (None,), *[("expert", None)] * len(biases)),
                 out_axes=("batch", None), placement=placement)(x, ids, weights, w_gate_up, w_down, slot_of, *biases)
