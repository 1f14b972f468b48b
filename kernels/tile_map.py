"""The tile map shared by the tiled backends (cpu, pallas, mosaic_gpu): where each row goes in a
buffer of whole tiles.

Rows routed to expert g are placed contiguously starting on a tile boundary, so every tile of
`block_m` rows belongs to exactly one expert and a kernel never masks rows or re-reads an expert's
weights for a tile that straddles two groups. Experts with no rows get no tiles at all; the padding
costs at most `block_m - 1` zero rows per *present* expert.

    group_sizes [G] ──_tile_map──▶ Tiles(group [num_tiles], active [])
    sorted rows [R] ──tile_rows──▶ buffer row of each row [num_tiles * block_m]

The buffer's static size is the worst case over all routings with R rows (`max_tiles`); tiles at and
past `active` hold no rows, and kernels skip them without touching memory.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from .permute import group_of_sorted_rows


class Tiles(NamedTuple):
    """Per-tile metadata of a tiled buffer (a pytree; block_m is static and kept by the caller)."""

    group: jax.Array  # [num_tiles] int32: local expert of each tile; inactive tiles repeat the last active one
    active: jax.Array  # [] int32: tiles [0, active) hold rows


def max_tiles(num_rows: int, num_groups: int, block_m: int) -> int:
    """Most tiles any routing of num_rows rows over num_groups groups can need (at least 1).

    Each non-empty group g needs ceil(n_g / bm) = 1 + (n_g - 1) // bm tiles, so k non-empty groups need
    at most k + (R - k) // bm, which grows with k up to k = min(G, R).
    """
    k = min(num_groups, num_rows)
    return max(1, k + (num_rows - k) // block_m)


def _tile_map(group_sizes: jax.Array, num_tiles: int, block_m: int) -> tuple[Tiles, jax.Array]:
    """group_sizes: [G] -> (Tiles over num_tiles tiles, first row of each group in the tiled buffer [G])."""
    group_tiles = (group_sizes + block_m - 1) // block_m
    ends = jnp.cumsum(group_tiles)
    active = ends[-1].astype(jnp.int32)
    last = jnp.maximum(active - 1, 0)
    tile = jnp.minimum(jnp.arange(num_tiles, dtype=jnp.int32), last)
    group = jnp.searchsorted(ends, tile, side="right").astype(jnp.int32)
    group = jnp.minimum(group, group_sizes.shape[0] - 1)  # only reached when no tile is active
    return Tiles(group, active), ((ends - group_tiles) * block_m).astype(jnp.int32)


def tile_rows(group_sizes: jax.Array, num_rows: int, block_m: int) -> tuple[Tiles, jax.Array, int]:
    """Place rows sorted by group into the tiled buffer.

    group_sizes: [G]; the groups' rows are the first sum(group_sizes) rows of a [R]-row array sorted
    by group (rows after them belong to no group). Returns (tiles, buffer row [R] int32 of each input
    row -- num_buffer_rows for rows of no group --, num_buffer_rows).
    """
    num_tiles = max_tiles(num_rows, group_sizes.shape[0], block_m)
    tiles, tiled_start = _tile_map(group_sizes, num_tiles, block_m)
    ends = jnp.cumsum(group_sizes)
    rank = jnp.arange(num_rows, dtype=jnp.int32)
    group = group_of_sorted_rows(group_sizes, num_rows)
    buffer_row = tiled_start[group] + rank - (ends - group_sizes)[group]
    num_buffer_rows = num_tiles * block_m
    return tiles, jnp.where(rank < ends[-1], buffer_row, num_buffer_rows).astype(jnp.int32), num_buffer_rows


def source_rows(buffer_row: jax.Array, num_buffer_rows: int, source: jax.Array | None = None) -> jax.Array:
    """Inverse of `tile_rows`: for each buffer row, what sits there ([num_buffer_rows] int32).

    source: [R] what to record per input row (default: its index). Empty buffer rows get INT32_MAX,
    which `gather_rows` turns into a zero row.
    """
    source = jnp.arange(buffer_row.shape[0], dtype=jnp.int32) if source is None else source
    return jnp.full((num_buffer_rows,), jnp.iinfo(jnp.int32).max, jnp.int32).at[buffer_row].set(source, mode="drop")


def gather_rows(x: jax.Array, rows: jax.Array) -> jax.Array:
    """x[rows] with out-of-range rows as zeros. x: [N, D], rows: [M] -> [M, D]."""
    return jnp.take(x, rows, axis=0, mode="fill", fill_value=0)
