"""The data between scheduler and executor: an IterationPlan in, a StepResult out.

A plan says, for every layer group of the model, which token rows pass through it this iteration.
Rows come in slices: consecutive tokens of one request that pass a contiguous layer range.

    chunked prefill:  every slice passes layers [0, L); a prompt slice is a token chunk
    layered prefill:  decode slices pass [0, L); a prompt slice (the whole prompt) passes [a, b)

A slice that starts past layer 0 continues from hidden states the executor kept from an earlier
iteration; one that ends before layer L leaves its hidden states for a later one. A slice whose last
token is the request's last known token and which passes the last layer is sampled. The plan knows
nothing of devices: executors decide how it runs (one mesh, two submeshes, host-resident experts, a
cost model).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

if TYPE_CHECKING:
    from moejax.engine.kv_transfer import KVPayload
    from moejax.engine.sampling import TokenLogprobs


class RowSlice(NamedTuple):  # a NamedTuple: hundreds are made per iteration, it must be cheap
    request_id: int
    start: int  # position of the first token
    token_ids: tuple[int, ...]  # the slice's tokens (embedded when layer_start == 0)
    layer_start: int
    layer_end: int
    sample: bool  # draw the request's next token from the last row's logits
    context_len: int  # tokens of the request visible to the last row (start + len(token_ids))

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def is_decode(self) -> bool:
        return self.num_tokens == 1 and self.sample and self.layer_start == 0


class LayerGroup(NamedTuple):
    """Layers [layer_start, layer_end) run once on the rows of `slices` (indices into plan.slices)."""

    layer_start: int
    layer_end: int
    slices: tuple[int, ...]


class SamplingRow(NamedTuple):
    """What the sampler needs for one sampled slice."""

    request_id: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    output_index: int  # index of the token being drawn in the request's output
    logprobs: bool = False  # also report log-probabilities (SamplingParams.logprobs)


@dataclass(frozen=True)
class IterationPlan:
    step: int
    slices: tuple[RowSlice, ...]
    groups: tuple[LayerGroup, ...]
    block_tables: dict[int, tuple[int, ...]]  # request id -> its KV blocks (KV group 0's: all layers' when one group)
    sampling: tuple[SamplingRow, ...]  # in the order of the sampled slices
    released: tuple[int, ...] = ()  # requests whose executor-side state (kept hidden rows) can go
    num_layers: int = 0
    kv_shards: dict[int, int] = field(default_factory=dict)  # request id -> request shard owning its KV (if > 1)
    # (request id, its blocks, KV) to write before the iteration runs: requests prefilled elsewhere
    kv_imports: tuple[tuple[int, tuple[int, ...], "KVPayload"], ...] = ()
    # Hybrid models: request id -> block tables of KV groups 1.. (sliding windows; -1: freed), for the
    # requests of block_tables and kv_imports (engine/kv_cache.py)
    group_block_tables: dict[int, tuple[tuple[int, ...], ...]] = field(default_factory=dict)
    # request id -> its state slot, for the requests of the slices and imports (Gated DeltaNet layers)
    state_slots: dict[int, int] = field(default_factory=dict)
    # Multi-step decode: every slice is a decode and runs up to `decode_steps` steps in one go, each
    # step's token feeding the next; per sampled slice, (stop token ids, tokens it may still produce).
    decode_steps: int = 1
    decode_limits: tuple[tuple[tuple[int, ...], int], ...] = ()

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.slices)

    def as_steps(self, produced: dict[int, int]) -> "IterationPlan":
        """A multi-step decode plan as the rows it ran: each request's slice covering the `produced`
        tokens it computed (for traffic accounting)."""
        slices = tuple(s._replace(token_ids=s.token_ids * produced[s.request_id],
                                  context_len=s.start + produced[s.request_id]) for s in self.slices)
        return replace(self, slices=slices)

    @property
    def num_decode_tokens(self) -> int:
        return sum(1 for s in self.slices if s.is_decode)

    @property
    def num_prefill_tokens(self) -> int:
        return self.num_tokens - self.num_decode_tokens

    @property
    def is_empty(self) -> bool:
        return not self.slices


def plan_of(step: int, slices: list[RowSlice], num_layers: int) -> IterationPlan:
    """A plan of just these slices (no KV, no sampling): what a policy prices before it decides."""
    return IterationPlan(step, tuple(slices), layer_groups(slices, num_layers), {}, (), num_layers=num_layers)


def layer_groups(slices: list[RowSlice] | tuple[RowSlice, ...], num_layers: int) -> tuple[LayerGroup, ...]:
    """Cut [0, L) at every slice boundary; each piece lists the slices that cover it. Pieces no
    slice covers are dropped (an iteration may run only some layers)."""
    if all(s.layer_start == 0 and s.layer_end == num_layers for s in slices):  # the common case
        return (LayerGroup(0, num_layers, tuple(range(len(slices)))),) if slices else ()
    cuts = sorted({0, num_layers, *(s.layer_start for s in slices), *(s.layer_end for s in slices)})
    groups = []
    for a, b in zip(cuts, cuts[1:]):
        members = tuple(i for i, s in enumerate(slices) if s.layer_start <= a and b <= s.layer_end)
        if members:
            groups.append(LayerGroup(a, b, members))
    return tuple(groups)


@dataclass
class LayerStats:
    """Per-layer traffic of one iteration (the currency of the MoE scheduling papers)."""

    distinct_experts: np.ndarray  # [L] int: experts with >= 1 token in the layer
    expert_bytes: np.ndarray  # [L] float: routed-expert weight bytes that must be read
    dense_weight_bytes: np.ndarray  # [L] float: attention + dense MLP / shared-expert weight bytes
    kv_read_bytes: np.ndarray  # [L] float
    kv_write_bytes: np.ndarray  # [L] float
    tokens: np.ndarray  # [L] int: rows that passed the layer
    expert_tokens: np.ndarray | None = None  # [L, E] int tokens per expert (real runs and sims that draw them)

    @property
    def total_expert_bytes(self) -> float:
        return float(self.expert_bytes.sum())


@dataclass
class StepResult:
    """What an executor reports for one plan. Per-layer traffic (`layer_stats`) is computed only when
    someone reads it: the engine loop needs just the routed-expert bytes."""

    sampled: dict[int, int]  # request id -> new token (a multi-step plan: its first)
    elapsed_s: float  # wall time (real executors) or modelled time (simulator)
    expert_bytes: float  # routed-expert weight bytes the iteration had to read
    stats: Callable[[], LayerStats] | LayerStats | None = None  # the stats, or how to compute them
    energy_j: float = 0.0
    extra: dict = field(default_factory=dict)
    sampled_steps: dict[int, list[int]] | None = None  # multi-step plans: every token, in order
    logprobs: dict[int, "TokenLogprobs"] = field(default_factory=dict)  # request id -> for rows that asked

    @cached_property
    def layer_stats(self) -> LayerStats:
        if self.stats is None:
            raise ValueError("this step result carries no per-layer statistics")
        return self.stats if isinstance(self.stats, LayerStats) else self.stats()
