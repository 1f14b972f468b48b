"""The request bodies of the OpenAI API as pydantic models, and what they ask of the engine.

Types are strict (a float is not an integer token id, "1" is not a number) and unknown fields are
rejected, so a malformed body is a 400 naming its field. Value ranges are not repeated here: the body
becomes SamplingParams and the engine's `check_request`, the one validation every front end (LLM, CLI,
HTTP) goes through, and their errors name the field too. Fields the API has but moejax does not
implement are accepted at their neutral value only. vLLM's extra sampling fields (top_k, ignore_eos,
stop_token_ids, return_token_ids) are accepted in the body.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict

from moejax.engine.sampling import MAX_LOGPROBS, RequestError, SamplingParams

MAX_N = 16  # choices per request (each is an engine request)
OPENAI_DEFAULT_TEMPERATURE = 1.0  # the API's default (0 is greedy)
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # the completions API's default; chat defaults to the rest of the context


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    presence_penalty: float | None = None  # not implemented: 0 only
    frequency_penalty: float | None = None  # not implemented: 0 only
    logit_bias: dict[str, float] | None = None  # not implemented: empty only
    # vLLM's extras
    top_k: int | None = None  # 0 or -1: off
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    return_token_ids: bool = False  # each choice also carries its token ids (and the prompt's)

    def unsupported(self) -> list[tuple[str, Any]]:
        """(field, value) of fields set to something moejax does not implement."""
        out = [(f, v) for f, v in (("presence_penalty", self.presence_penalty),
                                   ("frequency_penalty", self.frequency_penalty)) if v not in (None, 0)]
        if self.logit_bias:
            out.append(("logit_bias", self.logit_bias))
        return out

    def check(self) -> None:
        """What only this API has to say about a body (the rest is SamplingParams' and the engine's)."""
        for field, value in self.unsupported():
            raise RequestError(f"{field}={value!r} is not supported by moejax (only its neutral value)", param=field)
        if not 1 <= self.n <= MAX_N:
            raise RequestError(f"n={self.n}: must be in [1, {MAX_N}]", param="n")
        if self.stream_options is not None and not self.stream:
            raise RequestError("stream_options is only allowed with stream: true", param="stream_options")
        if any(s == "" for s in self.stop_strings):
            raise RequestError("stop strings must not be empty", param="stop")

    @property
    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def requested_max_tokens(self) -> tuple[int | None, str]:
        """(max_tokens asked for or None, the field that asked)."""
        return self.max_tokens, "max_tokens"

    def default_max_tokens(self, room: int) -> int:
        """max_tokens when the body gives none, with `room` tokens of context left after the prompt."""
        raise NotImplementedError

    def num_logprobs(self) -> int | None:
        raise NotImplementedError

    def sampling_params(self, prompt_len: int, max_model_len: int, choice: int) -> SamplingParams:
        """The engine's SamplingParams of choice `choice` (of n) for a prompt of `prompt_len` tokens;
        a given seed is offset by the choice so that the n choices differ (as vLLM does)."""
        max_tokens, field = self.requested_max_tokens()
        if max_tokens is None:
            max_tokens = max(1, self.default_max_tokens(max_model_len - prompt_len))
        seed = self.seed if self.seed is None or self.n == 1 else self.seed + choice
        temperature = OPENAI_DEFAULT_TEMPERATURE if self.temperature is None else self.temperature
        try:
            return SamplingParams(max_tokens=max_tokens, temperature=temperature,
                                  top_p=1.0 if self.top_p is None else self.top_p,
                                  top_k=0 if self.top_k in (None, -1) else self.top_k, seed=seed,
                                  stop_token_ids=tuple(self.stop_token_ids or ()), ignore_eos=self.ignore_eos,
                                  logprobs=self.num_logprobs())
        except RequestError as e:
            param = {"max_tokens": field, "logprobs": self.logprobs_field}.get(e.param, e.param)
            raise RequestError(str(e).removeprefix("SamplingParams."), param=param) from None

    logprobs_field: ClassVar[str] = "logprobs"  # the field an invalid SamplingParams.logprobs came from


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False  # not implemented: false only
    best_of: int | None = None  # not implemented: n only
    suffix: str | None = None  # not implemented

    def unsupported(self) -> list[tuple[str, Any]]:
        out = super().unsupported()
        if self.echo:
            out.append(("echo", self.echo))
        if self.best_of not in (None, self.n):
            out.append(("best_of", self.best_of))
        if self.suffix:
            out.append(("suffix", self.suffix))
        return out

    def prompts(self) -> list[str | list[int]]:
        """The prompts of the body: one text or token-id list, or a batch of either."""
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]
        if not self.prompt:
            raise RequestError("prompt is empty", param="prompt")
        return list(self.prompt)

    def default_max_tokens(self, room: int) -> int:
        return min(COMPLETIONS_DEFAULT_MAX_TOKENS, room)

    def num_logprobs(self) -> int | None:
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise RequestError(f"logprobs={self.logprobs}: must be in [0, {MAX_LOGPROBS}]", param="logprobs")
        return self.logprobs


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True  # vLLM's: end the prompt where the assistant's answer starts
    tools: list[dict] | None = None  # not implemented: empty only
    tool_choice: str | None = None  # not implemented: "none" only
    response_format: dict | None = None  # not implemented: {"type": "text"} only

    logprobs_field: ClassVar[str] = "top_logprobs"

    def unsupported(self) -> list[tuple[str, Any]]:
        out = super().unsupported()
        if self.tools:
            out.append(("tools", self.tools))
        if self.tool_choice not in (None, "none"):
            out.append(("tool_choice", self.tool_choice))
        if self.response_format not in (None, {"type": "text"}):
            out.append(("response_format", self.response_format))
        return out

    def check(self) -> None:
        super().check()
        if not self.messages:
            raise RequestError("messages is empty: give at least one message", param="messages")
        if self.top_logprobs is not None and not self.logprobs:
            raise RequestError("top_logprobs needs logprobs: true", param="top_logprobs")

    def conversation(self) -> list[dict]:
        """The messages as the chat template sees them (text content; 'developer' is 'system')."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text(),
                 **({"name": m.name} if m.name else {})} for m in self.messages]

    def requested_max_tokens(self) -> tuple[int | None, str]:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"

    def default_max_tokens(self, room: int) -> int:
        return room

    def num_logprobs(self) -> int | None:
        if not self.logprobs:
            return None
        k = self.top_logprobs or 0
        if not 0 <= k <= MAX_LOGPROBS:
            raise RequestError(f"top_logprobs={k}: must be in [0, {MAX_LOGPROBS}]", param="top_logprobs")
        return k
