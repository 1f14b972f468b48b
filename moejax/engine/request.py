"""A request as the scheduler sees it: its tokens, its KV blocks, how far it has been computed."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from moejax.engine.sampling import SamplingParams, TokenLogprobs


class Status(enum.Enum):
    WAITING = "waiting"  # not admitted, or preempted (its KV freed, to be recomputed)
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    request_id: int
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int  # the sampler's seed (params.seed, or one derived from the engine seed and the id)
    arrival_time: float = 0.0
    token_ids: list[int] = field(default_factory=list)  # prompt + output so far
    status: Status = Status.WAITING
    num_computed_tokens: int = 0  # tokens whose KV is written in every layer
    block_ids: tuple[int, ...] = ()  # immutable: plans share it instead of copying it every iteration
    # Hybrid models (sliding-window and full-attention layers): the block tables of KV groups 1.. (block_ids is
    # group 0's), indexed by logical block, -1 where a window's expired block was freed (engine/kv_cache.py)
    group_block_ids: tuple[tuple[int, ...], ...] = ()
    state_slot: int | None = None  # its fixed-size state slot (models with Gated DeltaNet layers)
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "handoff" (continued by another engine)
    handoff: bool = False  # after its first token, hand the request and its KV to another engine
    first_token_time: float | None = None
    token_times: list[float] = field(default_factory=list)  # when each output token was produced
    finish_time: float | None = None
    num_preemptions: int = 0
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # per output token, when params.logprobs is set

    def __post_init__(self):
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def num_uncomputed(self) -> int:
        """Tokens whose KV is still to be written (1 for a request in decode)."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED
