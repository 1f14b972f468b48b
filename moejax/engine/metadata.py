"""Host-side construction of the device inputs of one row set: padded to buckets so that the jitted
layer functions see only a few shapes (no recompilation in steady state)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from moejax.models.attention import AttentionMetadata


def bucket(n: int, minimum: int = 8) -> int:
    """The padded size for n rows: the next power of two, at least `minimum`."""
    return max(minimum, 1 << max(0, n - 1).bit_length())


def attention_metadata(positions: np.ndarray, seq_ids: np.ndarray, block_tables: np.ndarray,
                       block_size: int, num_blocks: int, row_bucket: int | None = None,
                       seq_bucket: int | None = None) -> AttentionMetadata:
    """Rows: positions [n], seq_ids [n] (into block_tables [S, max_blocks]) -> padded device metadata.

    Padding rows sit at position 0 of sequence 0, write to a slot past the cache (dropped) and are
    marked invalid so no expert sees them.
    """
    n = len(positions)
    T = row_bucket or bucket(n)
    S = seq_bucket or bucket(len(block_tables), minimum=1)
    positions = np.asarray(positions, np.int32)
    seq_ids = np.asarray(seq_ids, np.int32)
    tables = np.zeros((S, block_tables.shape[1]), np.int32)
    tables[: len(block_tables)] = block_tables
    slots = tables[seq_ids, positions // block_size] * block_size + positions % block_size
    pad = T - n
    return jax.device_put(AttentionMetadata(
        positions=np.pad(positions, (0, pad)),
        slot_mapping=np.pad(slots, (0, pad), constant_values=num_blocks * block_size),
        seq_ids=np.pad(seq_ids, (0, pad)),
        block_tables=tables,
        num_kv_blocks=np.int32(positions.max() // block_size + 1 if n else 0),
        valid=np.arange(T) < n,
    ))


def pad_tokens(token_ids: np.ndarray, size: int) -> jax.Array:
    return jnp.asarray(np.pad(np.asarray(token_ids, np.int32), (0, size - len(token_ids))))
