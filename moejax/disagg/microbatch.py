"""Micro-batch ping-pong (MegaScale-Infer, arXiv 2504.02263): a layer group's rows split by request
into m micro-batches, so that the attention pool works on one while the expert pool works on another.

    choose_micro_batches   m from the cost model's attention and expert seconds of a step
    split_rows             which rows of a row map each micro-batch takes (shard-major, like the map)
"""

from __future__ import annotations

import numpy as np

from moejax.engine.metadata import bucket


def choose_micro_batches(attention_s: float, experts_s: float, per_batch_s: float, most: int = 3) -> int:
    """The m in 1..most minimising a two-stage pipeline's time max(A, F) + min(A, F) / m (the shorter
    stage hides behind the longer one but for one micro-batch) + (m - 1) * per_batch_s (each extra
    micro-batch pays its kernel launches and exchange messages again)."""
    if min(attention_s, experts_s, per_batch_s) < 0:
        raise ValueError(f"negative seconds: attention {attention_s}, experts {experts_s}, per batch {per_batch_s}")
    long, short = max(attention_s, experts_s), min(attention_s, experts_s)
    return min(range(1, most + 1), key=lambda m: long + short / m + (m - 1) * per_batch_s)


def split_rows(valid: np.ndarray, seq_ids: np.ndarray, shards: int, m: int) -> list[np.ndarray]:
    """Rows of a row map (`valid`, `seq_ids`: [T], laid out in `shards` equal shard-major spans)
    split by request into at most m micro-batches, each request's rows whole and in its own shard.
    -> per micro-batch the source row of each of its rows [T_j] (-1: padding), shard-major with
    every shard padded to one bucket. Requests of a shard go to micro-batches in order, cut where
    the running token count crosses a multiple of its total / m."""
    width = len(valid) // shards
    batches: list[list[list[int]]] = [[[] for _ in range(shards)] for _ in range(m)]
    for s in range(shards):
        rows = np.flatnonzero(valid[s * width:(s + 1) * width]) + s * width
        if not len(rows):
            continue
        starts = np.flatnonzero(np.r_[True, seq_ids[rows[1:]] != seq_ids[rows[:-1]]])  # one run per request
        for first, end in zip(starts, np.r_[starts[1:], len(rows)]):
            batches[min(m - 1, first * m // len(rows))][s].extend(rows[first:end])
    out = []
    for per_shard in batches:
        longest = max(len(r) for r in per_shard)
        if longest == 0:
            continue
        w = bucket(longest)
        out.append(np.concatenate([np.pad(np.asarray(r, np.int64), (0, w - len(r)), constant_values=-1)
                                   for r in per_shard]).astype(np.int32))
    return out
