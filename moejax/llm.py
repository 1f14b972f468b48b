"""The Python API: `LLM(model).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import jax.numpy as jnp
import numpy as np

from moejax.checkpoint import load_model
from moejax.engine.metadata import attention_metadata, bucket, pad_tokens
from moejax.engine.sampling import RequestError, SamplingParams, sample

Prompt = str | Sequence[int]


@dataclass
class RequestOutput:
    request_id: int
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str | None = None
    finish_reason: str | None = None  # "length" | "stop" | "abort"


class LLM:
    """Generate with a MoE model: a preset name (seeded random weights), a HF checkpoint directory,
    or a saved moejax checkpoint."""

    def __init__(self, model: str = "tiny-qwen3-moe", *, dtype: str | None = None, seed: int = 0,
                 block_size: int = 16):
        self.model, self.tokenizer = load_model(model, dtype=dtype, seed=seed)
        self.config = self.model.config
        self.seed = seed
        self.block_size = block_size
        self.last_stats: dict[str, float] = {}

    # --- requests ---------------------------------------------------------------------------------
    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError(f"{self.config.name} has no tokenizer: pass token ids, not text")
            ids = self.tokenizer.encode(prompt).ids
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise RequestError("prompt is empty")
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise RequestError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {self.config.vocab_size})")
        if len(ids) >= self.config.max_position:
            raise RequestError(f"prompt has {len(ids)} tokens; the model's context is {self.config.max_position}")
        return ids

    def decode(self, token_ids: list[int]) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode(token_ids)

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], (int, np.integer))):
            prompts = [prompts]
        params = params or SamplingParams()
        per_request = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(per_request) != len(prompts):
            raise RequestError(f"{len(per_request)} SamplingParams for {len(prompts)} prompts")
        outputs = [RequestOutput(i, self.encode(p)) for i, p in enumerate(prompts)]
        start = time.perf_counter()
        self._run(outputs, per_request)
        elapsed = time.perf_counter() - start
        for out in outputs:
            out.text = self.decode(out.token_ids)
        n = sum(len(o.token_ids) for o in outputs)
        self.last_stats = {"output_tokens": n, "seconds": elapsed, "tokens_per_s": n / max(elapsed, 1e-9)}
        return outputs

    # --- a simple batched loop: prefill each prompt, then decode all together ----------------------
    def _run(self, outputs: list[RequestOutput], params: list[SamplingParams]) -> None:
        bs, cfg = self.block_size, self.config
        lengths = [min(len(o.prompt_token_ids) + p.max_tokens, cfg.max_position) for o, p in zip(outputs, params)]
        blocks = [math.ceil(n / bs) for n in lengths]
        tables = np.zeros((len(outputs), max(blocks)), np.int32)
        first = np.cumsum([0] + blocks[:-1])
        for i, (f, b) in enumerate(zip(first, blocks)):
            tables[i, :b] = np.arange(f, f + b)
        num_blocks = int(sum(blocks))
        kv = self.model.init_kv_cache(num_blocks, bs)
        seeds = np.array([p.seed if p.seed is not None else (self.seed * 1_000_003 + i) % 2**32
                          for i, p in enumerate(params)], np.uint32)

        def step(tokens: list[int], positions: list[int], seq_ids: list[int], sample_rows: list[int],
                 reqs: list[int]) -> list[int]:
            meta = attention_metadata(np.array(positions), np.array(seq_ids), tables, bs, num_blocks)
            T = meta.positions.shape[0]
            x = self.model.embed(pad_tokens(tokens, T))
            x, _ = self.model.run_layers(x, kv, meta)
            R = bucket(len(sample_rows))
            logits = self.model.logits(x, pad_tokens(sample_rows, R))
            p = [params[r] for r in reqs] + [params[reqs[0]]] * (R - len(reqs))
            idx = reqs + [reqs[0]] * (R - len(reqs))
            toks = sample(logits, jnp.array([q.temperature for q in p], jnp.float32),
                          jnp.array([q.top_k for q in p], jnp.int32), jnp.array([q.top_p for q in p], jnp.float32),
                          jnp.asarray(seeds[idx]), jnp.array([len(outputs[r].token_ids) for r in idx], jnp.int32))
            return np.asarray(toks)[: len(reqs)].tolist()

        def accept(r: int, token: int) -> None:
            out, p = outputs[r], params[r]
            out.token_ids.append(token)
            stops = set(p.stop_token_ids) | (set() if p.ignore_eos else set(cfg.eos_token_ids))
            if token in stops:
                out.finish_reason = "stop"
            elif len(out.token_ids) >= p.max_tokens or len(out.prompt_token_ids) + len(out.token_ids) >= lengths[r]:
                out.finish_reason = "length"

        for r, out in enumerate(outputs):
            n = len(out.prompt_token_ids)
            accept(r, step(out.prompt_token_ids, list(range(n)), [r] * n, [n - 1], [r])[0])
        while active := [r for r, o in enumerate(outputs) if o.finish_reason is None]:
            positions = [len(outputs[r].prompt_token_ids) + len(outputs[r].token_ids) - 1 for r in active]
            toks = step([outputs[r].token_ids[-1] for r in active], positions, active,
                        list(range(len(active))), active)
            for r, t in zip(active, toks):
                accept(r, t)
