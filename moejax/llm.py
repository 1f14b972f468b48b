"""The Python API: `LLM(model).generate(prompts, SamplingParams(...))`, streaming, abort."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from moejax.checkpoint import checkpoint_dir, load_model
from moejax.chat_template import ChatTemplate, load_chat_template
from moejax.engine.compiles import count_compilations
from moejax.engine.factory import build
from moejax.engine.request import Request
from moejax.engine.sampling import RequestError, SamplingParams, TokenLogprobs

Prompt = str | Sequence[int]

# Tokens per iteration for offline generation (the engine's default, 512, suits serving, where a long
# chunk holds up running decodes): whole batches of prompts prefill in fewer, bigger iterations and
# start decoding together. Measured side by side on the bench checkpoint (prompts of 32 tokens, 128
# new): 4% and 11% less time than 512 at 64 and 256 prompts, no different at 16
# (benchmarks/offline_token_budget.json).
OFFLINE_TOKEN_BUDGET = 2048


@dataclass
class RequestOutput:
    request_id: int
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    metrics: dict = field(default_factory=dict)  # arrival / first token / finish times, ttft, preemptions
    logprobs: list[TokenLogprobs] | None = None  # per output token, when SamplingParams.logprobs is set


@dataclass
class TokenDelta:
    """New output of one request since the last delta (streaming)."""

    request_id: int
    token_ids: list[int]
    text: str | None
    finished: bool
    finish_reason: str | None = None
    logprobs: list[TokenLogprobs] | None = None  # of these tokens, when SamplingParams.logprobs is set


class LLM:
    """Generate with a MoE model: a preset name (seeded random weights), a HF checkpoint directory,
    or a saved moejax checkpoint, placed by `layout` (a moejax.meshes preset name, a .toml file or a
    Layout; an attention/experts split layout is served by the "disagg" executor; default one device).
    Engine options (policy and its options, token_budget (here OFFLINE_TOKEN_BUDGET unless given),
    max_num_seqs, max_model_len, block_size, num_blocks, kv_budget_bytes, ...) go to `moejax.engine.build`.

    offload: keep the routed experts in host memory with a device expert cache (moejax.offload), e.g.
    {"device_expert_slots": 8, "predictor": "learned"} or {"offload_experts": 0.75, "predictor": "lfru"};
    a learned predictor is looked for next to the checkpoint."""

    def __init__(self, model: str = "tiny-qwen3-moe", *, dtype: str | None = None, seed: int = 0,
                 layout=None, executor: str = "jax", offload: dict | None = None, **engine_options):
        engine_options.setdefault("token_budget", OFFLINE_TOKEN_BUDGET)
        self.model, self.tokenizer = load_model(model, dtype=dtype, seed=seed, layout=layout)
        path = checkpoint_dir(model) if isinstance(model, str) else None
        self.chat_template: ChatTemplate | None = load_chat_template(path) if path else None
        self.config = self.model.config
        if offload is not None:
            from moejax.offload.executor import executor_options

            executor = "offload"
            engine_options.update(executor_options(offload, model, owned=True))
        elif executor == "jax" and not self.model.placements.colocated:
            executor = "disagg"  # an attention/experts split layout: the pools exchange rows per layer
        self.engine = build(self.model, executor, seed=seed, **engine_options)
        self.last_stats: dict[str, float] = {}

    def warmup(self, progress: bool = True) -> int:
        """Compile ahead every program serving meets (Engine.warmup), with a progress bar; returns how
        many were compiled. Afterwards generate / stream compile nothing for chunked policies."""
        return self.engine.warmup(progress=progress)

    # --- requests ------------------------------------------------------------------------------------
    def encode(self, prompt: Prompt, param: str = "prompt") -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError(f"{self.config.name} has no tokenizer: pass token ids, not text", param=param)
            return self.tokenizer.encode(prompt).ids
        return list(prompt)  # checked by engine.check_request

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """A conversation ([{"role", "content"}, ...]) as the prompt text the model's chat template makes."""
        if self.chat_template is None:
            raise RequestError(f"{self.config.name} has no chat template (tokenizer_config.json 'chat_template' "
                               "or chat_template.jinja): send a plain prompt instead", param="messages")
        return self.chat_template.render(messages, add_generation_prompt=add_generation_prompt, **kwargs)

    def decode(self, token_ids: list[int]) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode(token_ids)

    def add(self, prompts: Prompt | Sequence[Prompt],
            params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[Request]:
        """Queue prompts without running them (generate / stream run the engine)."""
        if isinstance(prompts, str) or (len(prompts) and isinstance(prompts[0], (int, float, np.number))):
            prompts = [prompts]
        params = params or SamplingParams()
        per_request = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(per_request) != len(prompts):
            raise RequestError(f"{len(per_request)} SamplingParams for {len(prompts)} prompts")
        # one validation for every front end (LLM, CLI, HTTP); all checked before any is queued
        encoded = [self.engine.check_request(self.encode(p), sp) for p, sp in zip(prompts, per_request)]
        return [self.engine.add_request(ids, p) for ids, p in zip(encoded, per_request)]

    def abort(self, request_id: int) -> None:
        """Stop a request mid-way (its stream then ends with finish_reason "abort"); an id this LLM
        never gave out is an error."""
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
                    if delta.finished:  # decided before yielding: an abort during the yield gets its own delta
                        del sent[r.request_id]
                    yield delta

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
        return TokenDelta(r.request_id, out[already:], text, r.is_finished, r.finish_reason,
                          r.logprobs[already:] if r.params.logprobs is not None else None)

    def _output(self, r: Request) -> RequestOutput:
        return RequestOutput(
            r.request_id, list(r.prompt_token_ids), r.output_token_ids, self.decode(r.output_token_ids),
            r.finish_reason,
            {"arrival_time": r.arrival_time, "first_token_time": r.first_token_time, "finish_time": r.finish_time,
             "ttft_s": None if r.first_token_time is None else r.first_token_time - r.arrival_time,
             "num_preemptions": r.num_preemptions},
            list(r.logprobs) if r.params.logprobs is not None else None)
