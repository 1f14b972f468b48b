"""The slow, obviously-correct twin of the engine: one request at a time, a private contiguous KV
cache, the whole prompt in one forward, then one token per forward. Engine outputs are held equal
to this for every policy, batch composition and preemption pattern."""

from __future__ import annotations

import math

import numpy as np

from moejax.engine.metadata import attention_metadata, pad_tokens
from moejax.models.model import Model


def prompt_logits(model: Model, prompt: list[int], block_size: int = 16) -> np.ndarray:
    """[len(prompt), V] fp32 logits of one prompt's full forward."""
    nb = math.ceil(len(prompt) / block_size)
    kv = model.init_kv_cache(nb, block_size)
    meta = attention_metadata(np.arange(len(prompt)), np.zeros(len(prompt)), np.arange(nb, dtype=np.int32)[None],
                              block_size, nb)
    x, _ = model.run_layers(model.embed(pad_tokens(prompt, meta.positions.shape[0])), kv, meta)
    return np.asarray(model.logits(x))[: len(prompt)]


def greedy_generate(model: Model, prompt: list[int], max_new_tokens: int, block_size: int = 16) -> list[int]:
    """Greedy continuation of one prompt (no stop tokens)."""
    total = len(prompt) + max_new_tokens
    nb = math.ceil(total / block_size)
    tables = np.arange(nb, dtype=np.int32)[None]
    kv = model.init_kv_cache(nb, block_size)
    tokens, out = list(prompt), []
    start = 0
    while len(out) < max_new_tokens:
        new = tokens[start:]
        positions = np.arange(start, len(tokens))
        meta = attention_metadata(positions, np.zeros(len(new)), tables, block_size, nb)
        x, _ = model.run_layers(model.embed(pad_tokens(new, meta.positions.shape[0])), kv, meta)
        logits = np.asarray(model.logits(x, pad_tokens([len(new) - 1], 8)))[0]
        out.append(int(np.argmax(logits)))
        start = len(tokens)
        tokens.append(out[-1])
    return out
