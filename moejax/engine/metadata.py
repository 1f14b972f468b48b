"""Host-side construction of the device inputs of one row set: padded to buckets so that the jitted
layer functions see only a few shapes (no recompilation in steady state)."""

from __future__ import annotations

import jax
import numpy as np

from moejax.models.attention import AttentionMetadata


def bucket(n: int, minimum: int = 8) -> int:
    """The padded size for n rows: the next power of two, at least `minimum`."""
    return max(minimum, 1 << max(0, n - 1).bit_length())


def attention_metadata(positions: np.ndarray, seq_ids: np.ndarray, block_tables: np.ndarray,
                       block_size: int, num_blocks: int, row_bucket: int | None = None,
                       seq_bucket: int | None = None, valid: np.ndarray | None = None,
                       sharding=None, once: bool = False,
                       window_tables: dict[int, np.ndarray] | None = None) -> AttentionMetadata:
    """Device metadata for a row set. Either n real rows (positions, seq_ids: [n]) padded at the end
    to `row_bucket`, or rows already laid out with padding in between (`valid`: [T] marks real rows).

    Padding rows sit at position 0 of sequence 0, write to a slot past the cache (dropped: num_blocks
    must be at least every pool's size) and are marked invalid so no expert sees them.
    window_tables: a window-aware cache's block tables of the layers of each window (like
    block_tables; their freed entries may hold any block id: the attention never reads them).
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
    )
    if sharding is None:
        return meta if once else jax.device_put(meta)  # reused by every layer: transfer it once
    rows, table = sharding(("batch",)), sharding((None, None))
    return to_device(meta, AttentionMetadata(rows, rows, rows, table, sharding(()), rows,
                                             {w: rows for w in windows}, {w: table for w in windows}))


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
