"""Host-side construction of the device inputs of one row set: padded to buckets so that the jitted
layer functions see only a few shapes (no recompilation in steady state)."""

from __future__ import annotations

import jax
import numpy as np

from moejax.models.attention import AttentionMetadata
from moejax.models.gated_deltanet import CHUNK, RecurrentMetadata


def bucket(n: int, minimum: int = 8) -> int:
    """The padded size for n rows: the next power of two, at least `minimum`."""
    return max(minimum, 1 << max(0, n - 1).bit_length())


def attention_metadata(positions: np.ndarray, seq_ids: np.ndarray, block_tables: np.ndarray,
                       block_size: int, num_blocks: int, row_bucket: int | None = None,
                       seq_bucket: int | None = None, valid: np.ndarray | None = None,
                       sharding=None, once: bool = False,
                       window_tables: dict[int, np.ndarray] | None = None, state_slots: np.ndarray | None = None,
                       num_state_slots: int = 0) -> AttentionMetadata:
    """Device metadata for a row set. Either n real rows (positions, seq_ids: [n]) padded at the end
    to `row_bucket`, or rows already laid out with padding in between (`valid`: [T] marks real rows).
    The rows of one sequence are consecutive.

    Padding rows sit at position 0 of sequence 0, write to a slot past the cache (dropped: num_blocks
    must be at least every pool's size) and are marked invalid so no expert sees them.
    window_tables: a window-aware cache's block tables of the layers of each window (like
    block_tables; their freed entries may hold any block id: the attention never reads them).
    state_slots: [len(block_tables)] each sequence's state slot of `num_state_slots` (models with
    Gated DeltaNet layers: see recurrent_metadata).
    `sharding(logical_axes)` places the arrays (None: default). once: the metadata feeds a single
    jitted call; unsharded, it then stays on the host (see to_device).
    """
    positions = np.asarray(positions, np.int32)
    seq_ids = np.asarray(seq_ids, np.int32)
    if valid is None:
        n = len(positions)
        T = row_bucket or bucket(n)
        valid = np.arange(T) < n
        positions, seq_ids = np.pad(positions, (0, T - n)), np.pad(seq_ids, (0, T - n))
    valid = np.asarray(valid, bool)
    positions, seq_ids = np.where(valid, positions, 0), np.where(valid, seq_ids, 0)
    S = seq_bucket or bucket(len(block_tables))

    def padded(block_tables):  # -> ([S, max_blocks] tables, [T] slot of each row)
        tables = np.zeros((S, block_tables.shape[1]), np.int32)
        tables[: len(block_tables)] = block_tables
        slots = tables[seq_ids, positions // block_size] * block_size + positions % block_size
        return tables, np.where(valid, slots, num_blocks * block_size).astype(np.int32)

    tables, slots = padded(block_tables)
    windows = {w: padded(t) for w, t in (window_tables or {}).items()}
    meta = AttentionMetadata(
        positions=positions,
        slot_mapping=slots,
        seq_ids=seq_ids,
        block_tables=tables,
        num_kv_blocks=np.int32(positions[valid].max() // block_size + 1 if valid.any() else 0),
        valid=valid,
        window_slots={w: s for w, (_, s) in windows.items()},
        window_tables={w: t for w, (t, _) in windows.items()},
        recurrent=None if state_slots is None else recurrent_metadata(
            seq_ids, valid, np.asarray(state_slots, np.int32), num_state_slots),
    )
    if sharding is None:
        return meta if once else jax.device_put(meta)  # reused by every layer: transfer it once
    rows, table = sharding(("batch",)), sharding((None, None))
    recurrent = None if state_slots is None else jax.tree.map(lambda a: sharding((None,) * a.ndim), meta.recurrent)
    return to_device(meta, AttentionMetadata(rows, rows, rows, table, sharding(()), rows,
                                             {w: rows for w in windows}, {w: table for w in windows}, recurrent))


def recurrent_metadata(seq_ids: np.ndarray, valid: np.ndarray, state_slots: np.ndarray,
                       num_state_slots: int) -> RecurrentMetadata:
    """How Gated DeltaNet layers take the rows [T]: each run of consecutive real rows of one sequence
    is a slice; a one-row slice takes a recurrent step, a longer one passes in tiles of CHUNK rows.
    state_slots: [S] each sequence's slot. Row and tile counts are padded to buckets (0 stays 0, so
    an iteration without decodes or without prompts skips that path)."""
    T = len(valid)
    rows = np.flatnonzero(valid)
    starts = rows[np.r_[True, (np.diff(rows) != 1) | (np.diff(seq_ids[rows]) != 0)]] if rows.size else rows
    lengths = np.diff(np.r_[np.searchsorted(rows, starts), rows.size])
    steps = starts[lengths == 1]
    R = bucket(len(steps)) if len(steps) else 0
    tiles = [(start + offset, min(CHUNK, n - offset)) for start, n in zip(starts[lengths > 1], lengths[lengths > 1])
             for offset in range(0, n, CHUNK)]
    N = bucket(len(tiles), minimum=1) if tiles else 0
    tile_rows = np.full((N, CHUNK), T, np.int32)
    for i, (first, n) in enumerate(tiles):
        tile_rows[i, :n] = np.arange(first, first + n)
    return RecurrentMetadata(
        step_rows=np.pad(steps, (0, R - len(steps)), constant_values=T).astype(np.int32),
        step_slots=np.pad(state_slots[seq_ids[steps]], (0, R - len(steps)), constant_values=num_state_slots
                          ).astype(np.int32),
        tile_rows=tile_rows,
        tile_slots=np.array([state_slots[seq_ids[first]] for first, _ in tiles] + [num_state_slots] * (N - len(tiles)),
                            np.int32),
        tile_lengths=np.array([n for _, n in tiles] + [0] * (N - len(tiles)), np.int32))


def to_device(tree, sharding=None):
    """Host values for one jitted call -> arrays placed by `sharding` (one for every leaf, or a
    matching tree). None: left on the host, for the call to transfer (uncommitted, default device):
    jit moves small numpy inputs several times faster than a device_put before it. A sharding over
    several processes' devices needs the same values in every process, each building only its own
    shards: jax.device_put would first compare the values across processes, a collective on every call."""
    if sharding is None:
        return tree
    shardings = jax.tree.map(lambda _: sharding, tree) if isinstance(sharding, jax.sharding.Sharding) else sharding
    if all(s.is_fully_addressable for s in jax.tree.leaves(shardings)):
        return jax.device_put(tree, shardings)
    return jax.tree.map(lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda index: np.asarray(x)[index]),
                        tree, shardings)


def pad_tokens(token_ids: np.ndarray, size: int, sharding=None) -> jax.Array:
    return to_device(np.pad(np.asarray(token_ids, np.int32), (0, size - len(token_ids))), sharding)
