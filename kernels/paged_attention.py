"""Paged attention in plain jnp, two ways (and on XLA:CPU a native kernel, native.py; on
GPUs a Pallas kernel, pallas_attention.py):

    rows   every token row gathers, CHUNK blocks at a time, the KV of its own sequence: one
           vectorised loop over KV blocks for all rows (what accelerators want from XLA). Cost:
           T x context.
    tiles  rows go in tiles of TILE consecutive rows. A tile whose rows belong to one sequence (a
           prefill chunk) reads that sequence's blocks once and stops at the tile's last position;
           mixed tiles (decode rows) fall back to `rows`. A sequential loop over tiles — the right
           trade on a CPU, where a long prompt would otherwise re-read its KV for every row.

Both attend causally (up to and including the row's own position), optionally within a sliding
window -- then reading only the blocks of the window, so a cache may free the blocks before it --
and optionally with attention sinks (per-head logits in the softmax denominator), with an online
softmax over blocks so memory stays O(rows x block_size). Loop bounds are traced scalars: growing
contexts never recompile. The loops take any paged caches and a function turning their gathered
blocks into keys and values: MLA's latent cache (latent_attention.py) reuses them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from . import native, pallas_attention

TILE = 32  # rows per tile
CHUNK = 8  # KV blocks read per loop step


def write_rows(cache: jax.Array, rows: jax.Array, slot_mapping: jax.Array) -> jax.Array:
    """Scatter new rows [T, ...] into a paged cache [num_blocks, block_size, ...] at their flat slots
    [T] (block * block_size + offset); out-of-range slots (padding rows) are dropped."""
    cache = jnp.asarray(cache)
    flat = cache.reshape(-1, *cache.shape[2:])
    return flat.at[slot_mapping].set(rows.astype(cache.dtype), mode="drop").reshape(cache.shape)


def write_kv(k_cache: jax.Array, v_cache: jax.Array, k: jax.Array, v: jax.Array,
             slot_mapping: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Scatter new rows into the caches. caches: [num_blocks, block_size, KV, hd]; k, v: [T, KV, hd]."""
    return write_rows(k_cache, k, slot_mapping), write_rows(v_cache, v, slot_mapping)


def _f32(*gathered):
    """A GQA cache's gathered blocks as they are attended: (keys, values) in fp32."""
    return tuple(g.astype(jnp.float32) for g in gathered)


def _online_softmax(qg, positions, window, num_steps, step_kv, sinks=None):
    """Attention of rows qg: [R, KV, g, hd] (pre-scaled, fp32) at `positions` [R] over the keys that
    step_kv(j) gives at step j of num_steps: (keys [R or 1, n, KV, hd], values [R or 1, n, KV, dv],
    key positions [R or 1, n]); values may be narrower or wider than keys (MLA) -> [R, KV, g, dv].
    sinks: [KV, g] fp32 logits that join every row's softmax denominator (no value), or None."""
    R, kvh, g, _ = qg.shape
    dv = jax.eval_shape(step_kv, jnp.int32(0))[1].shape[-1]

    def visit(j, carry):
        m, l, acc = carry  # running max [R, KV, g], denominator [R, KV, g], numerator [R, KV, g, dv]
        k, v, key_pos = step_kv(j)
        shared = k.shape[0] == 1  # one sequence's keys for all rows: contract without copying them per row
        s = jnp.einsum("rkgd,bkd->rkgb", qg, k[0]) if shared else jnp.einsum("rkgd,rbkd->rkgb", qg, k)
        visible = key_pos <= positions[:, None]
        if window is not None:
            visible &= key_pos > positions[:, None] - window
        visible = visible[:, None, None, :]
        m_new = jnp.maximum(m, jnp.max(jnp.where(visible, s, -jnp.inf), axis=-1))
        p = jnp.where(visible, jnp.exp(s - m_new[..., None]), 0.0)
        correction = jnp.exp(m - m_new)
        l = l * correction + p.sum(-1)
        pv = jnp.einsum("rkgb,bkd->rkgd", p, v[0]) if shared else jnp.einsum("rkgb,rbkd->rkgd", p, v)
        acc = acc * correction[..., None] + pv
        return m_new, l, acc

    # A row's first visible key lies in the blocks visited, so m becomes finite there; starting from
    # a large finite value keeps exp(m - m_new) defined before it. A sink is a logit with no value:
    # the running max and denominator start from it (exp(sink - sink) = 1).
    if sinks is None:
        m0, l0 = jnp.full((R, kvh, g), -1e30, jnp.float32), jnp.zeros((R, kvh, g), jnp.float32)
    else:
        m0, l0 = jnp.broadcast_to(sinks, (R, kvh, g)), jnp.ones((R, kvh, g), jnp.float32)
    _, l, acc = jax.lax.fori_loop(0, num_steps, visit, (m0, l0, jnp.zeros((R, kvh, g, dv), jnp.float32)))
    return acc / jnp.maximum(l, 1e-30)[..., None]


def _first_block(min_position, window, block_size):
    """The first block holding a key a row at min_position sees (0 without a window)."""
    return 0 if window is None else jnp.maximum(min_position - window + 1, 0) // block_size


def _window_blocks(window, block_size) -> int:
    """Most blocks the keys of one row's window touch."""
    return (window - 2 + block_size) // block_size + 1


def _gather_blocks(cache, tables, logical, last):
    """cache[tables[logical]] for logical blocks [R or 1, C] (clamped to the table) -> [R or 1, C*bs, ...]."""
    blocks = jnp.take_along_axis(tables, jnp.minimum(logical, last), axis=1)
    return cache[blocks].reshape(*logical.shape[:1], -1, *cache.shape[2:])


def _step_kv(caches, to_kv, tables, first, block_size):
    """step_kv of _online_softmax over logical blocks first + j*CHUNK ... of tables [R or 1, max_blocks]
    (first: [R or 1]); blocks past a table's end only hold keys past every row here: masked."""
    last = tables.shape[1] - 1

    def step_kv(j):
        logical = first[:, None] + j * CHUNK + jnp.arange(CHUNK)  # [R or 1, CHUNK]
        key_pos = (logical[:, :, None] * block_size + jnp.arange(block_size)).reshape(logical.shape[0], -1)
        return (*to_kv(*(_gather_blocks(c, tables, logical, last) for c in caches)), key_pos)
    return step_kv


def _rows(qg, caches, to_kv, positions, tables, num_blocks, window, sinks=None):
    """Every row over its own sequence's blocks. caches: paged arrays [num_blocks, block_size, ...];
    to_kv(*their gathered blocks [R, n, ...]) -> (keys, values); tables: [R, max_blocks], each row's
    own block table. CHUNK blocks per step: fewer, larger loop steps (a loop step costs far more
    than its few small ops on short decode contexts). A windowed row starts at the first block of
    its window: blocks before it are never read (a window-aware cache may have freed them)."""
    R, bs = tables.shape[0], caches[0].shape[1]
    first = jnp.broadcast_to(_first_block(positions, window, bs), (R,))
    span = num_blocks if window is None else jnp.minimum(num_blocks, _window_blocks(window, bs))
    step_kv = _step_kv(caches, to_kv, tables, first, bs)
    return _online_softmax(qg, positions, window, -(-span // CHUNK), step_kv, sinks)


def _sequence(qg, caches, to_kv, table, positions, num_blocks, window, sinks=None):
    """Rows of one sequence (block table [max_blocks]): its blocks, from the first block of the
    earliest row's window, read once for all of them."""
    first = _first_block(jnp.min(positions), window, caches[0].shape[1])
    step_kv = _step_kv(caches, to_kv, table[None], jnp.reshape(first, (1,)), caches[0].shape[1])
    return _online_softmax(qg, positions, window, -(-(num_blocks - first) // CHUNK), step_kv, sinks)


def _by_tile(per_tile, xs, positions, seq_ids):
    """per_tile(xs_t, positions_t, seq_ids_t) -> [TILE, ...] on tiles of TILE consecutive rows, one
    tile at a time; xs: a tree of [T, ...] row arrays -> [T, ...] (padded rows: position 0, sequence 0)."""
    T = positions.shape[0]
    pad = -T % TILE
    tiles = (T + pad) // TILE

    def as_tiles(a):
        return jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)).reshape(tiles, TILE, *a.shape[1:])

    out = jax.lax.map(lambda args: per_tile(*args), (jax.tree.map(as_tiles, xs), as_tiles(positions),
                                                     as_tiles(seq_ids)))
    return out.reshape(tiles * TILE, *out.shape[2:])[:T]


def paged_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, positions: jax.Array,
                    seq_ids: jax.Array, block_tables: jax.Array, num_kv_blocks: jax.Array, *,
                    scale: float, window: int | None = None, sinks: jax.Array | None = None,
                    method: str | None = None) -> jax.Array:
    """q: [T, H, hd]; caches: [num_blocks, block_size, KV, hd]; positions, seq_ids: [T];
    block_tables: [S, max_blocks]; num_kv_blocks: [] blocks the longest row needs -> [T, H, hd].
    window: a row sees keys (position - window, position]; only the blocks holding them are read.
    sinks: [H] per-head logits that join the softmax denominator (GPT-OSS's attention sinks).
    method: "rows" | "tiles" | "auto" (tiles when a tile holds a prompt chunk, else rows) | "native"
    (native.py: XLA:CPU only, no sinks) | "pallas" (pallas_attention.py: compiled on GPU,
    interpreted elsewhere); default native on CPU (auto where it cannot be built, or with sinks),
    pallas on GPU, rows elsewhere."""
    q, k_cache, v_cache, positions, seq_ids, block_tables = map(
        jnp.asarray, (q, k_cache, v_cache, positions, seq_ids, block_tables))
    if method is None:
        method = _default_method(sinks)
    if method == "pallas":
        if sinks is not None and jnp.shape(sinks) != (q.shape[1],):
            raise ValueError(f"paged_attention: sinks has shape {jnp.shape(sinks)}; expected ({q.shape[1]},), one per head")
        return pallas_attention.paged_attention(q, k_cache, v_cache, positions, seq_ids, block_tables, scale=scale,
                                                window=window, sinks=sinks).astype(q.dtype)
    if method == "native":
        if sinks is not None:
            raise ValueError("paged_attention: the native CPU kernel has no attention sinks "
                             "(method rows, tiles or auto)")
        return native.paged_attention(q, k_cache, v_cache, positions, seq_ids, block_tables,
                                      scale=scale, window=window).astype(q.dtype)
    T, H, hd = q.shape
    kvh = k_cache.shape[2]
    qg = q.reshape(T, kvh, H // kvh, hd).astype(jnp.float32) * scale
    if sinks is not None:
        if jnp.shape(sinks) != (H,):
            raise ValueError(f"paged_attention: sinks has shape {jnp.shape(sinks)}; expected ({H},), one per head")
        sinks = jnp.asarray(sinks, jnp.float32).reshape(kvh, H // kvh)
    method = method or "rows"

    def rows(_):
        return _rows(qg, (k_cache, v_cache), _f32, positions, block_tables[seq_ids], num_kv_blocks, window, sinks)

    def tiles(_):
        return _tiles(qg, k_cache, v_cache, positions, seq_ids, block_tables, window, sinks)

    if method == "rows":
        out = rows(None)
    elif method == "tiles":
        out = tiles(None)
    elif method == "auto":  # tiles pay off only if some tile holds a prompt's consecutive rows
        out = jax.lax.cond(_has_prompt_tile(positions, seq_ids), tiles, rows, None)
    else:
        raise ValueError(f"paged_attention: unknown method {method!r} (rows, tiles, auto, native, pallas)")
    return out.reshape(T, H, hd).astype(q.dtype)


def _default_method(sinks) -> str | None:
    """The method a platform runs by default (None: rows)."""
    platform = jax.default_backend()
    if platform == "cpu":
        return "native" if sinks is None and native.available() else "auto"
    return "pallas" if platform == "gpu" else None


def _has_prompt_tile(positions: jax.Array, seq_ids: jax.Array) -> jax.Array:
    """Whether some TILE-row tile belongs to one sequence at more than one position (a prefill
    chunk; padding rows all sit at position 0 of sequence 0, decode rows each in their own sequence)."""
    pad = -positions.shape[0] % TILE
    pos, seq = (jnp.pad(a, (0, pad)).reshape(-1, TILE) for a in (positions, seq_ids))
    return jnp.any(jnp.all(seq == seq[:, :1], axis=1) & (pos.max(axis=1) > pos.min(axis=1)))


def _tiles(qg, k_cache, v_cache, positions, seq_ids, block_tables, window, sinks):
    caches, bs = (k_cache, v_cache), k_cache.shape[1]

    def one_tile(q_t, pos_t, seq_t):
        blocks_needed = jnp.max(pos_t) // bs + 1
        return jax.lax.cond(  # one sequence: its blocks once for the tile; mixed (decode rows): per row
            jnp.all(seq_t == seq_t[0]),
            lambda _: _sequence(q_t, caches, _f32, block_tables[seq_t[0]], pos_t, blocks_needed, window, sinks),
            lambda _: _rows(q_t, caches, _f32, pos_t, block_tables[seq_t], blocks_needed, window, sinks), None)

    return _by_tile(one_tile, qg, positions, seq_ids)
