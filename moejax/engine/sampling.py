"""Sampling parameters and the on-device sampler.

Randomness is per request and per output position: the key for the n-th token of a request is
fold_in(key(seed), n). A request therefore draws the same tokens whatever batch, schedule or
preemption it goes through.

Log-probabilities (`SamplingParams.logprobs`) are those of the model's distribution (log-softmax of
the raw logits, before temperature / top-k / top-p, as vLLM and the OpenAI API report them), computed
on device with the sampled token: the sampled token's and the MAX_LOGPROBS most likely ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import jax
import jax.numpy as jnp

from moejax import kernels

MAX_LOGPROBS = 20  # most alternatives a request can ask for (OpenAI's top_logprobs limit)


class RequestError(ValueError):
    """A request is invalid; the message names the field and what was expected, `param` the field
    (what the HTTP server reports as the OpenAI error's `param`)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class TokenLogprobs(NamedTuple):
    """One sampled token's log-probability and the most likely alternatives (most likely first)."""

    logprob: float
    top_ids: tuple[int, ...]
    top_logprobs: tuple[float, ...]


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k cut
    seed: int | None = None  # None: derived from the engine's seed and the request id
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; k: the sampled token's log-probability and the k most likely

    def __post_init__(self):
        def bad(name: str, why: str):
            raise RequestError(f"SamplingParams.{name}={getattr(self, name)!r}: {why}", param=name)

        def is_int(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        if not is_int(self.max_tokens) or self.max_tokens < 1:
            bad("max_tokens", "must be an integer >= 1")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not self.temperature >= 0:
            bad("temperature", "must be >= 0 (0 means greedy)")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if not is_int(self.top_k) or self.top_k < 0:
            bad("top_k", "must be an integer >= 0 (0 disables top-k)")
        if self.seed is not None and not (is_int(self.seed) and 0 <= self.seed < 2**32):
            bad("seed", "must be an integer in [0, 2**32)")
        if self.logprobs is not None and not (is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS):
            bad("logprobs", f"must be an integer in [0, {MAX_LOGPROBS}] or None")
        if not isinstance(self.ignore_eos, bool):
            bad("ignore_eos", "must be true or false")
        object.__setattr__(self, "stop_token_ids", tuple(check_token_ids(self.stop_token_ids, "stop_token_ids")))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def check_token_ids(token_ids, what: str, vocab_size: int | None = None) -> list[int]:
    """Token ids as ints: integers only (a float or bool is an error, not truncated), within the
    vocabulary when its size is given."""
    if isinstance(token_ids, (str, bytes)) or not hasattr(token_ids, "__iter__"):
        raise RequestError(f"{what}: expected a list of integer token ids, got {type(token_ids).__name__}", param=what)
    ids = []
    for i, t in enumerate(token_ids):
        if isinstance(t, bool) or not hasattr(t, "__index__"):
            raise RequestError(f"{what}[{i}] = {t!r}: token ids must be integers", param=what)
        ids.append(t.__index__())
    if vocab_size is not None:
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise RequestError(f"{what} token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})", param=what)
    return ids


@jax.jit
def sample(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array,
           seeds: jax.Array, positions: jax.Array) -> jax.Array:
    """logits: [B, V] fp32; per-row temperature [B], top_k [B] (0 = off), top_p [B], seeds [B] uint32,
    positions [B] (index of the token being drawn in its request's output) -> tokens [B] int32."""
    greedy = kernels.argmax(logits)

    def draw(_):
        V = logits.shape[-1]
        scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
        desc = -jnp.sort(-scaled, axis=-1)
        k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
        kth = jnp.take_along_axis(desc, (k - 1)[:, None], axis=-1)
        # nucleus: keep the smallest prefix of sorted tokens whose probability reaches top_p
        cum = jnp.cumsum(jax.nn.softmax(desc, axis=-1), axis=-1)
        cut = jnp.minimum(jnp.sum(cum < top_p[:, None], axis=-1), V - 1)
        pth = jnp.take_along_axis(desc, cut[:, None], axis=-1)
        masked = jnp.where(scaled >= jnp.maximum(kth, pth), scaled, -jnp.inf)
        keys = jax.vmap(lambda s, n: jax.random.fold_in(jax.random.key(s), n))(seeds, positions)
        drawn = jax.vmap(jax.random.categorical)(keys, masked).astype(jnp.int32)
        return jnp.where(temperature > 0, drawn, greedy)

    return jax.lax.cond(jnp.any(temperature > 0), draw, lambda _: greedy, None)


@jax.jit
def sample_with_logprobs(logits: jax.Array, *columns: jax.Array):
    """`sample` and the log-probabilities: -> (tokens [B], their logprobs [B], top ids [B, MAX_LOGPROBS],
    top logprobs [B, MAX_LOGPROBS]), from the raw logits' log-softmax."""
    tokens = sample(logits, *columns)
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    chosen = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    top_logprobs, top_ids = jax.lax.top_k(logprobs, min(MAX_LOGPROBS, logits.shape[-1]))
    return tokens, chosen, top_ids.astype(jnp.int32), top_logprobs
