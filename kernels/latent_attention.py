"""Paged attention over multi-head latent attention's cache (DeepSeek-V2/V3, arXiv 2405.04434).

Per token the cache holds the compressed latent c [r] and one rope key k_rope [rope] shared by all
heads; head h's key is (c @ W_uk[h], k_rope) and its value c @ W_uv[h]. Two forms of one attention:

    absorbed  W_uk folds into the query (q_nope[h] @ W_uk[h]^T: [r]), so every head attends over the
              latent itself -- one shared key/value "head" of width r + rope / r, MQA-like -- and W_uv
              is applied once to each row's output. Per row and key: H (2r + rope) multiply-adds;
              nothing is decompressed. What decode rows want.
    naive     decompresses the attended tokens' keys and values (r H (nope + v) multiply-adds per
              key), then attends per head (H (nope + rope + v) per row and key). The decompression
              is paid once per key for all the rows sharing it, so it pays off only for many rows
              of one sequence: a prompt tile.

Both run the online-softmax block loops of paged_attention.py (rows: each row over its own blocks;
sequence: a tile of one sequence's rows over its blocks read once). form="auto" chooses per tile:
naive for a prompt tile when it is the cheaper form (`naive_is_cheaper`), else absorbed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .paged_attention import TILE, _by_tile, _has_prompt_tile, _rows, _sequence

FORMS = ("absorbed", "naive", "auto")


def naive_is_cheaper(rows: int, kv_lora_rank: int, nope: int, rope: int, v: int) -> bool:
    """Whether `rows` rows of one sequence attend more cheaply to a key decompressed once for all of
    them (r (nope + v) + rows (nope + rope + v) multiply-adds per head) than over the latent
    (rows (2r + rope))."""
    return kv_lora_rank * (nope + v) + rows * (nope + rope + v) < rows * (2 * kv_lora_rank + rope)


def _form(name: str, w_uk: jax.Array, w_uv: jax.Array, scale: float):
    """(query of rows, (keys, values) of gathered cache blocks, output of rows) of a form; fp32.
    w_uk: [r, H, nope], w_uv: [r, H, v]."""
    if name == "absorbed":
        def query(q_nope, q_rope):  # [R, H, nope], [R, H, rope] -> [R, 1, H, r + rope]
            q_latent = jnp.einsum("thn,chn->thc", q_nope, w_uk)
            return (jnp.concatenate([q_latent, q_rope], axis=-1) * scale)[:, None]

        def keys_values(latent, k_rope):  # [B, n, r], [B, n, rope] -> [B, n, 1, r + rope], [B, n, 1, r]
            latent = latent.astype(jnp.float32)
            return jnp.concatenate([latent, k_rope.astype(jnp.float32)], axis=-1)[:, :, None], latent[:, :, None]

        def output(out):  # [R, 1, H, r] -> [R, H, v]
            return jnp.einsum("thc,chv->thv", out[:, 0], w_uv)
        return query, keys_values, output

    def query(q_nope, q_rope):  # -> [R, H, 1, nope + rope]
        return (jnp.concatenate([q_nope, q_rope], axis=-1) * scale)[:, :, None]

    def keys_values(latent, k_rope):  # -> [B, n, H, nope + rope], [B, n, H, v]
        latent = latent.astype(jnp.float32)
        k_nope = jnp.einsum("bnc,chd->bnhd", latent, w_uk)
        k_rope = jnp.broadcast_to(k_rope.astype(jnp.float32)[:, :, None], (*k_nope.shape[:3], k_rope.shape[-1]))
        return jnp.concatenate([k_nope, k_rope], axis=-1), jnp.einsum("bnc,chd->bnhd", latent, w_uv)

    def output(out):  # [R, H, 1, v] -> [R, H, v]
        return out[:, :, 0]
    return query, keys_values, output


def paged_latent_attention(q_nope: jax.Array, q_rope: jax.Array, latent_cache: jax.Array, rope_cache: jax.Array,
                           w_uk: jax.Array, w_uv: jax.Array, positions: jax.Array, seq_ids: jax.Array,
                           block_tables: jax.Array, num_kv_blocks: jax.Array, *, scale: float,
                           form: str = "auto", method: str | None = None) -> jax.Array:
    """q_nope: [T, H, nope], q_rope: [T, H, rope] (rotated); latent_cache: [num_blocks, block_size, r],
    rope_cache: [num_blocks, block_size, rope]; w_uk: [r, H, nope], w_uv: [r, H, v] (kv_b_proj per
    head); positions, seq_ids: [T]; block_tables: [S, max_blocks]; num_kv_blocks: [] -> [T, H, v].
    form: "absorbed" | "naive" | "auto" (naive for prompt tiles where naive_is_cheaper, else absorbed);
    method: paged_attention's jnp methods, "rows" | "tiles" | "auto" (the native CPU kernel reads k/v
    caches only); default auto on CPU, rows elsewhere ("rows" has no tiles: form auto is then absorbed)."""
    if form not in FORMS:
        raise ValueError(f"paged_latent_attention: unknown form {form!r} ({', '.join(FORMS)})")
    q_nope, q_rope, latent_cache, rope_cache, positions, seq_ids, block_tables = map(
        jnp.asarray, (q_nope, q_rope, latent_cache, rope_cache, positions, seq_ids, block_tables))
    r, H, nope = w_uk.shape
    forms = {name: _form(name, jnp.asarray(w_uk, jnp.float32), jnp.asarray(w_uv, jnp.float32), scale)
             for name in ("absorbed", "naive")}
    caches = (latent_cache, rope_cache)
    q = (q_nope.astype(jnp.float32), q_rope.astype(jnp.float32))
    bs = latent_cache.shape[1]
    prompt_form = "naive" if naive_is_cheaper(TILE, r, nope, q_rope.shape[-1], w_uv.shape[-1]) else "absorbed"

    def by_rows(name, q_t, pos_t, tables, num_blocks):
        query, keys_values, output = forms[name]
        return output(_rows(query(*q_t), caches, keys_values, pos_t, tables, num_blocks, None))

    def by_sequence(name, q_t, pos_t, table, num_blocks):
        query, keys_values, output = forms[name]
        return output(_sequence(query(*q_t), caches, keys_values, table, pos_t, num_blocks, None))

    def one_tile(q_t, pos_t, seq_t):
        blocks_needed = jnp.max(pos_t) // bs + 1
        one_sequence = jnp.all(seq_t == seq_t[0])
        if form == "auto":
            shared, mixed = prompt_form, "absorbed"
            one_sequence &= jnp.max(pos_t) > jnp.min(pos_t)  # a prompt tile, not a decode row + padding
        else:
            shared = mixed = form
        return jax.lax.cond(one_sequence,
                            lambda _: by_sequence(shared, q_t, pos_t, block_tables[seq_t[0]], blocks_needed),
                            lambda _: by_rows(mixed, q_t, pos_t, block_tables[seq_t], blocks_needed), None)

    def rows(_):
        return by_rows("absorbed" if form == "auto" else form, q, positions, block_tables[seq_ids], num_kv_blocks)

    def tiles(_):
        return _by_tile(one_tile, q, positions, seq_ids)

    method = method or ("auto" if jax.default_backend() == "cpu" else "rows")
    if method == "rows":
        out = rows(None)
    elif method == "tiles":
        out = tiles(None)
    elif method == "auto":
        out = jax.lax.cond(_has_prompt_tile(positions, seq_ids), tiles, rows, None)
    else:
        raise ValueError(f"paged_latent_attention: unknown method {method!r} (rows, tiles, auto)")
    return out.astype(q_nope.dtype)
