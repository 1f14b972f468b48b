"""Sampling parameters and the on-device sampler.

Randomness is per request and per output position: the key for the n-th token of a request is
fold_in(key(seed), n). A request therefore draws the same tokens whatever batch, schedule or
preemption it goes through.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import jax
import jax.numpy as jnp


class RequestError(ValueError):
    """A request is invalid; the message names the field and what was expected."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k cut
    seed: int | None = None  # None: derived from the engine's seed and the request id
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False

    def __post_init__(self):
        def bad(name: str, why: str):
            raise RequestError(f"SamplingParams.{name}={getattr(self, name)!r}: {why}")

        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            bad("max_tokens", "must be an integer >= 1")
        if not self.temperature >= 0:
            bad("temperature", "must be >= 0 (0 means greedy)")
        if not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            bad("top_k", "must be an integer >= 0 (0 disables top-k)")
        if self.seed is not None and not (isinstance(self.seed, int) and 0 <= self.seed < 2**32):
            bad("seed", "must be an integer in [0, 2**32)")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@jax.jit
def sample(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array,
           seeds: jax.Array, positions: jax.Array) -> jax.Array:
    """logits: [B, V] fp32; per-row temperature [B], top_k [B] (0 = off), top_p [B], seeds [B] uint32,
    positions [B] (index of the token being drawn in its request's output) -> tokens [B] int32."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

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
