"""The Python API: `LLM(model).generate(prompts, SamplingParams(...))`, streaming, abort."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from moejax.checkpoint import load_model
from moejax.engine.compiles import count_compilations
from moejax.engine.factory import build
from moejax.engine.request import Request
from moejax.engine.sampling import RequestError, SamplingParams

Prompt = str | Sequence[int]


@dataclass
class RequestOutput:
    request_id: int
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    metrics: dict = field(default_factory=dict)  # arrival / first token / finish times, ttft, preemptions


@dataclass
class TokenDelta:
    """New output of one request since the last delta (streaming)."""

    request_id: int
    token_ids: list[int]
    text: str | None
    finished: bool
    finish_reason: str | None = None


class LLM:
    """Generate with a MoE model: a preset name (seeded random weights), a HF checkpoint directory,
    or a saved moejax checkpoint, placed by `layout` (a moejax.meshes preset name, a .toml file or a
    Layout; default one device). Engine options (policy and its options, token_budget, max_num_seqs,
    max_model_len, block_size, num_blocks, kv_budget_bytes, ...) go to `moejax.engine.build`."""

    def __init__(self, model: str = "tiny-qwen3-moe", *, dtype: str | None = None, seed: int = 0,
                 layout=None, executor: str = "jax", **engine_options):
        self.model, self.tokenizer = load_model(model, dtype=dtype, seed=seed, layout=layout)
        self.config = self.model.config
        self.engine = build(self.model, executor, seed=seed, **engine_options)
        self.last_stats: dict[str, float] = {}

    def warmup(self, progress: bool = True) -> int:
        """Compile ahead every program serving meets (Engine.warmup), with a progress bar; returns how
        many were compiled. Afterwards generate / stream compile nothing for chunked policies."""
        return self.engine.warmup(progress=progress)

    # --- requests ------------------------------------------------------------------------------------
    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError(f"{self.config.name} has no tokenizer: pass token ids, not text")
            return self.tokenizer.encode(prompt).ids
        return [int(t) for t in prompt]

    def decode(self, token_ids: list[int]) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode(token_ids)

    def add(self, prompts: Prompt | Sequence[Prompt],
            params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[Request]:
        """Queue prompts without running them (generate / stream run the engine)."""
        if isinstance(prompts, str) or (len(prompts) and isinstance(prompts[0], (int, np.integer))):
            prompts = [prompts]
        params = params or SamplingParams()
        per_request = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(per_request) != len(prompts):
            raise RequestError(f"{len(per_request)} SamplingParams for {len(prompts)} prompts")
        encoded = [self.encode(p) for p in prompts]  # validate all before queueing any
        return [self.engine.add_request(ids, p) for ids, p in zip(encoded, per_request)]

    def abort(self, request_id: int) -> None:
        self.engine.abort(request_id)

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        requests = self.add(prompts, params)
        start, steps = self.engine.clock.now(), len(self.engine.steps)
        with count_compilations() as compiled:
            while not all(r.is_finished for r in requests):
                self.engine.step()
        elapsed = self.engine.clock.now() - start
        n = sum(r.num_output_tokens for r in requests)
        self.last_stats = {"output_tokens": n, "seconds": elapsed, "tokens_per_s": n / max(elapsed, 1e-9),
                           "iterations": len(self.engine.steps) - steps, "compilations": compiled.count,
                           "compile_seconds": compiled.seconds}
        return [self._output(r) for r in requests]

    def stream(self, prompts: Prompt | Sequence[Prompt],
               params: SamplingParams | Sequence[SamplingParams] | None = None) -> Iterator[TokenDelta]:
        """Token deltas as the engine produces them. Abort a request mid-way with llm.abort(id)."""
        requests = self.add(prompts, params)
        sent = {r.request_id: 0 for r in requests}
        while sent:
            if self.engine.has_unfinished:
                self.engine.step()
            for r in requests:
                if r.request_id in sent and (r.num_output_tokens > sent[r.request_id] or r.is_finished):
                    delta = self._delta(r, sent[r.request_id])
                    sent[r.request_id] = r.num_output_tokens
                    if delta.finished:
                        del sent[r.request_id]
                    yield delta  # the consumer may abort r now: its final delta comes next round

    async def astream(self, prompts: Prompt | Sequence[Prompt],
                      params: SamplingParams | Sequence[SamplingParams] | None = None) -> AsyncIterator[TokenDelta]:
        """The async form of `stream`: yields to the event loop between iterations."""
        for delta in self.stream(prompts, params):
            yield delta
            await asyncio.sleep(0)

    def _delta(self, r: Request, already: int) -> TokenDelta:
        out = r.output_token_ids
        text = None
        if self.tokenizer is not None:
            text = self.tokenizer.decode(out)[len(self.tokenizer.decode(out[:already])):]
        return TokenDelta(r.request_id, out[already:], text, r.is_finished, r.finish_reason)

    def _output(self, r: Request) -> RequestOutput:
        return RequestOutput(
            r.request_id, list(r.prompt_token_ids), r.output_token_ids, self.decode(r.output_token_ids),
            r.finish_reason,
            {"arrival_time": r.arrival_time, "first_token_time": r.first_token_time, "finish_time": r.finish_time,
             "ttft_s": None if r.first_token_time is None else r.first_token_time - r.arrival_time,
             "num_preemptions": r.num_preemptions})
