"""The slow, obviously-correct twin of the engine: one request at a time, a private contiguous KV
cache, the whole prompt in one forward, then one token per forward. Engine outputs are held equal
to this for every policy, batch composition and preemption pattern.

Under a placement that splits requests over `batch` shards, the request lives on shard 0 (its rows
first, its blocks at the start of shard 0's range); the other shards hold only padding rows. In
Gated DeltaNet layers it keeps its state in slot 0.
"""

from __future__ import annotations

import math

import numpy as np

from moejax.engine.metadata import attention_metadata, bucket, pad_tokens
from moejax.models.model import Model


class _Sequence:
    def __init__(self, model: Model, max_len: int, block_size: int):
        self.model, self.block_size = model, block_size
        attention = model.placements.attention
        self.shards = attention.shards("batch") if attention else 1
        nb = bucket(math.ceil(max_len / block_size))  # a bucket: prompts of other lengths reuse the compiled layers
        self.num_blocks = nb * self.shards
        self.tables = np.arange(nb, dtype=np.int32)[None]
        self.kv = model.init_kv_cache(self.num_blocks, block_size, state_slots=1)

    def metadata(self, start: int, n: int):
        """Metadata of rows at positions start .. start+n-1."""
        return attention_metadata(np.arange(start, start + n), np.zeros(n), self.tables, self.block_size,
                                  self.num_blocks, row_bucket=self.shards * bucket(n), state_slots=np.zeros(1),
                                  num_state_slots=1)

    def forward(self, tokens: list[int], start: int):
        """Rows for tokens at positions start.. -> hidden [T, D] (the real rows first)."""
        meta = self.metadata(start, len(tokens))
        x = self.model.embed(pad_tokens(tokens, meta.positions.shape[0]))
        x, _ = self.model.run_layers(x, self.kv, meta)
        return x


def prompt_routing(model: Model, prompt: list[int], block_size: int = 16, hidden: bool = False):
    """[len(prompt), L, K] experts each prompt token chose in each layer (-1 in dense layers); with
    `hidden`, also the rows each layer's router saw before its norm (x + attention): ([n, L, K],
    [n, L, D] fp32) -- the features of a learned expert predictor (moejax.offload)."""
    seq = _Sequence(model, len(prompt), block_size)
    n = len(prompt)
    meta = seq.metadata(0, n)
    x = model.embed(pad_tokens(prompt, meta.positions.shape[0]))
    k = max(model.config.num_experts_per_tok, 1)
    ids, rows = [], []
    for i in range(model.config.num_layers):
        x, seq.kv[i], layer_ids, h = model.layer_routing(i, x, seq.kv[i], meta)
        layer_ids = np.asarray(layer_ids)[:n]
        ids.append(np.broadcast_to(layer_ids, (n, k)) if layer_ids.shape[1] != k else layer_ids)
        if hidden:
            rows.append(np.asarray(h[:n], np.float32))
    ids = np.stack(ids, axis=1)
    return (ids, np.stack(rows, axis=1)) if hidden else ids


def prompt_logits(model: Model, prompt: list[int], block_size: int = 16) -> np.ndarray:
    """[len(prompt), V] fp32 logits of one prompt's full forward."""
    x = _Sequence(model, len(prompt), block_size).forward(prompt, 0)
    return np.asarray(model.logits(x))[: len(prompt)]


def greedy_generate(model: Model, prompt: list[int], max_new_tokens: int, block_size: int = 16) -> list[int]:
    """Greedy continuation of one prompt (no stop tokens)."""
    seq = _Sequence(model, len(prompt) + max_new_tokens, block_size)
    tokens, out, start = list(prompt), [], 0
    while len(out) < max_new_tokens:
        x = seq.forward(tokens[start:], start)
        logits = np.asarray(model.logits(x, pad_tokens([len(tokens) - start - 1], 8)))[0]
        out.append(int(np.argmax(logits)))
        start = len(tokens)
        tokens.append(out[-1])
    return out
