"""Paged attention as a Pallas kernel for GPUs (the Triton lowering); on other platforms it runs in
Pallas' interpret mode (how CPU tests check it). Same semantics as paged_attention.py's "rows"
method, its spec: every row attends causally over its own sequence's blocks, optionally within a
sliding window (reading only the window's blocks) and with attention sinks.

    grid (rows, KV heads)    one program per row and KV head: the row's g = H / KV query heads
                             (padded to BLOCK_G, the least an MMA takes) against CHUNK blocks of
                             keys per loop step, gathered from the cache through the row's block
                             table (a dynamic slice of the table, then a vector gather of blocks:
                             the KV is never copied into a contiguous per-sequence buffer), with
                             an online softmax in fp32.

GPUs have no scalar prefetch: a row's block table is looked up by XLA before the call (tables[seq_ids],
[T, max_blocks] int32, a few bytes a row) and handed to the kernel as a block per row. Loop bounds are
the row's own (first block of its window .. the block of its position): short rows of a ragged batch
stop early, and growing contexts never recompile. Blocks are clamped to the row's last one, so no
block past the row's position is ever read (a freed block may hold anything).

jax.experimental.pallas.ops.gpu.paged_attention is the model (deprecated there, and it wants a
head-major cache [KV, pages, page_size, hd]; moejax's is token-major [blocks, block_size, KV, hd],
written by decode steps in place, so a transpose per call is out of the question).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

CHUNK = 8  # KV blocks per loop step
BLOCK_G = 16  # query heads per KV head a GPU program computes (tensor-core dots need >= 16 rows)


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _kernel(pos_ref, table_ref, q_ref, k_ref, v_ref, sink_ref, o_ref, *, scale, window, block_size, max_blocks):
    """pos_ref: [1] the row's position; table_ref: [W] its block table (padded); q_ref: [G, hd];
    k_ref / v_ref: [num_blocks, block_size, hd] one KV head of the caches; sink_ref: [G] sink logits
    (-inf: none); o_ref: [G, hd]."""
    position = pos_ref[0]
    q = q_ref[...].astype(jnp.float32) * scale
    G, span = q.shape[0], CHUNK * block_size
    last = jnp.minimum(position // block_size, max_blocks - 1)  # the row's own key's block: nothing after it is read
    first = 0 if window is None else jnp.maximum(position - window + 1, 0) // block_size

    def visit(j, carry):
        m, l, acc = carry  # running max [G], denominator [G], numerator [G, hd]
        start = first + j * CHUNK
        blocks = table_ref[pl.ds(start, CHUNK)]  # [CHUNK] (the table is padded past every start)
        logical = start + jnp.arange(CHUNK)
        blocks = jnp.where(logical <= last, blocks, table_ref[pl.ds(last, 1)])  # never past the row's block
        k = k_ref[blocks].reshape(span, -1).astype(jnp.float32)
        v = v_ref[blocks].reshape(span, -1).astype(jnp.float32)
        s = jnp.dot(q, k.T)  # [G, span]
        key_pos = start * block_size + jnp.arange(span)
        visible = key_pos <= position
        if window is not None:
            visible &= key_pos > position - window
        visible = jnp.broadcast_to(visible[None, :], s.shape)
        m_new = jnp.maximum(m, jnp.max(jnp.where(visible, s, -jnp.inf), axis=1))
        p = jnp.where(visible, jnp.exp(s - m_new[:, None]), 0.0)
        correction = jnp.exp(m - m_new)
        return m_new, l * correction + p.sum(axis=1), acc * correction[:, None] + jnp.dot(p, v)

    # As in paged_attention._online_softmax: a sink starts the max and the denominator (exp(0) = 1);
    # without one a large finite max keeps exp(m - m_new) defined until the first visible key.
    sinks = sink_ref[...]
    has_sink = sinks > -jnp.inf
    m0 = jnp.where(has_sink, sinks, -1e30)
    l0 = jnp.where(has_sink, 1.0, 0.0)
    _, l, acc = jax.lax.fori_loop(0, (last - first) // CHUNK + 1, visit,
                                  (m0, l0, jnp.zeros((G, q.shape[1]), jnp.float32)))
    o_ref[...] = (acc / jnp.maximum(l, 1e-30)[:, None]).astype(o_ref.dtype)


@partial(jax.jit, static_argnames=("scale", "window", "interpret"))
def paged_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, positions: jax.Array,
                    seq_ids: jax.Array, block_tables: jax.Array, *, scale: float, window: int | None = None,
                    sinks: jax.Array | None = None, interpret: bool | None = None) -> jax.Array:
    """q: [T, H, hd]; caches: [num_blocks, block_size, KV, hd]; positions, seq_ids: [T];
    block_tables: [S, max_blocks]; sinks: [H] or None -> [T, H, hd] float32.
    interpret: run in Pallas' interpret mode (default: everywhere but on a GPU)."""
    T, H, hd = q.shape
    num_blocks, block_size, KV, hd_k = k_cache.shape
    if v_cache.shape != k_cache.shape or hd_k != hd or H % KV:
        raise ValueError(f"pallas paged attention: q {q.shape} [T, H, hd] and caches {k_cache.shape}, "
                         f"{v_cache.shape} [blocks, block_size, KV, hd] need equal caches, q's head size "
                         "and H a multiple of KV")
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    g = H // KV
    G = _pow2(g) if interpret else max(BLOCK_G, _pow2(g))  # Triton blocks are powers of two
    qg = jnp.pad(q.reshape(T, KV, g, hd), ((0, 0), (0, 0), (0, G - g), (0, 0)))
    sink = jnp.full((KV, g), -jnp.inf, jnp.float32) if sinks is None else \
        jnp.asarray(sinks, jnp.float32).reshape(KV, g)
    sink = jnp.pad(sink, ((0, 0), (0, G - g)), constant_values=-jnp.inf)
    # each row's own table, wide enough for a CHUNK-block slice from any block it may start at
    width = _pow2(block_tables.shape[1] + CHUNK)
    tables = jnp.pad(jnp.asarray(block_tables, jnp.int32)[seq_ids],
                     ((0, 0), (0, width - block_tables.shape[1])))
    out = pl.pallas_call(
        partial(_kernel, scale=scale, window=window, block_size=block_size, max_blocks=block_tables.shape[1]),
        grid=(T, KV),
        in_specs=[
            pl.BlockSpec((1,), lambda t, h: (t,)),  # position
            pl.BlockSpec((None, width), lambda t, h: (t, 0)),  # block table
            pl.BlockSpec((None, None, G, hd), lambda t, h: (t, h, 0, 0)),  # q
            pl.BlockSpec((num_blocks, block_size, None, hd), lambda t, h: (0, 0, h, 0)),  # k cache, one head
            pl.BlockSpec((num_blocks, block_size, None, hd), lambda t, h: (0, 0, h, 0)),  # v cache
            pl.BlockSpec((None, G), lambda t, h: (h, 0)),  # sinks
        ],
        out_specs=pl.BlockSpec((None, None, G, hd), lambda t, h: (t, h, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((T, KV, G, hd), jnp.float32),
        interpret=interpret,
        name="moejax_paged_attention",
    )(jnp.asarray(positions, jnp.int32), tables, qg, k_cache, v_cache, sink)
    return out[:, :, :g].reshape(T, H, hd)
