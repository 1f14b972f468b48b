"""Paged attention, reference implementation (plain jnp; a Pallas kernel can take its place later).

Each token row attends to the KV of its own sequence, read through that sequence's block table, up to
and including its own position (causal), optionally limited to a sliding window. KV blocks are visited
one at a time with an online softmax, so memory stays O(T * block_size) however long the context;
the loop bound is a traced scalar, so context growth never recompiles.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def write_kv(k_cache: jax.Array, v_cache: jax.Array, k: jax.Array, v: jax.Array,
             slot_mapping: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Scatter new rows into the caches. caches: [num_blocks, block_size, KV, hd]; k, v: [T, KV, hd];
    slot_mapping: [T] flat slot (block * block_size + offset); out-of-range slots (padding) are dropped."""
    k_cache, v_cache = jnp.asarray(k_cache), jnp.asarray(v_cache)
    nb, bs, kvh, hd = k_cache.shape
    flat = (nb * bs, kvh, hd)
    k_cache = k_cache.reshape(flat).at[slot_mapping].set(k.astype(k_cache.dtype), mode="drop")
    v_cache = v_cache.reshape(flat).at[slot_mapping].set(v.astype(v_cache.dtype), mode="drop")
    return k_cache.reshape(nb, bs, kvh, hd), v_cache.reshape(nb, bs, kvh, hd)


def paged_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, positions: jax.Array,
                    seq_ids: jax.Array, block_tables: jax.Array, num_kv_blocks: jax.Array, *,
                    scale: float, window: int | None = None) -> jax.Array:
    """q: [T, H, hd]; caches: [num_blocks, block_size, KV, hd]; positions, seq_ids: [T];
    block_tables: [S, max_blocks]; num_kv_blocks: [] blocks to visit -> [T, H, hd] in q.dtype."""
    q, k_cache, v_cache, positions, seq_ids, block_tables = map(
        jnp.asarray, (q, k_cache, v_cache, positions, seq_ids, block_tables))
    T, H, hd = q.shape
    _, bs, kvh, _ = k_cache.shape
    g = H // kvh
    qg = q.reshape(T, kvh, g, hd).astype(jnp.float32) * scale
    tables = block_tables[seq_ids]  # [T, max_blocks]
    offsets = jnp.arange(bs, dtype=jnp.int32)

    def visit_block(j, carry):
        m, l, acc = carry  # running max [T, kvh, g], denominator [T, kvh, g], numerator [T, kvh, g, hd]
        blocks = tables[:, j]
        k = k_cache[blocks].astype(jnp.float32)  # [T, bs, kvh, hd]
        v = v_cache[blocks].astype(jnp.float32)
        s = jnp.einsum("tkgd,tbkd->tkgb", qg, k)
        key_pos = j * bs + offsets  # [bs]
        visible = key_pos[None, :] <= positions[:, None]
        if window is not None:
            visible &= key_pos[None, :] > positions[:, None] - window
        visible = visible[:, None, None, :]
        m_new = jnp.maximum(m, jnp.max(jnp.where(visible, s, -jnp.inf), axis=-1))
        p = jnp.where(visible, jnp.exp(s - m_new[..., None]), 0.0)
        correction = jnp.exp(m - m_new)
        l = l * correction + p.sum(-1)
        acc = acc * correction[..., None] + jnp.einsum("tkgb,tbkd->tkgd", p, v)
        return m_new, l, acc

    # A row's first visible key is in block 0 (or inside its window), so m is finite after the first
    # visible block; starting from a large finite value keeps exp(m - m_new) well defined before it.
    init = (jnp.full((T, kvh, g), -1e30, jnp.float32), jnp.zeros((T, kvh, g), jnp.float32),
            jnp.zeros((T, kvh, g, hd), jnp.float32))
    _, l, acc = jax.lax.fori_loop(0, num_kv_blocks, visit_block, init)
    out = acc / jnp.maximum(l, 1e-30)[..., None]
    return out.reshape(T, H, hd).astype(q.dtype)
