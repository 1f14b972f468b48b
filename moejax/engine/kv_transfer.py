"""KV hand-off between engines: one request's KV as a typed payload, and the request with it.

A prefill engine finishes a request marked `handoff` after its first token, exporting the KV of its
prompt (every layer, or a range of layers while it prefills); a decode engine admits the request
with that KV (`Engine.add_prefilled`) and continues from its next token. A sliding-window layer
exports only what the next token can see (kind "window": the last window - 1 tokens); a Gated
DeltaNet layer its request's fixed-size state slot (kind "recurrent", the same size however long the
prompt). Payloads are checked on import: a payload of another model or with other shapes is rejected
with what differs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import jax.numpy as jnp
import numpy as np

from moejax.config import ModelConfig
from moejax.engine.sampling import SamplingParams
from moejax.models.attention import CacheArray, LayerCache
from moejax.models.decoder import cache_layout


class KVTransferError(ValueError):
    """A KV payload does not fit the engine importing it; the message names what differs."""


def kv_layout(cfg: ModelConfig, dtype) -> dict:
    """What a payload must agree on to be importable: the KV each layer keeps per token."""
    return {"architecture": cfg.architecture, "num_layers": cfg.num_layers, "num_kv_heads": cfg.num_kv_heads,
            "head_dim": cfg.head_dim, "dtype": jnp.dtype(dtype).name, "sliding_windows": list(cfg.sliding_windows),
            "linear_layers": list(cfg.linear_layers)}


def layer_kv_state(cfg: ModelConfig, layer: int, num_tokens: int) -> tuple[LayerCache, int]:
    """(cache layout, tokens) of what a payload holds for `layer` of a request with num_tokens computed
    tokens: the arrays its attention caches (the layout's kind names them) for all of them; for a
    sliding-window layer (kind "window"), the last min(num_tokens, window - 1): every key the next
    token attends to besides its own; for a Gated DeltaNet layer (per request, kind "recurrent") its
    state slot, whatever num_tokens (`payload_shape`)."""
    window = cfg.sliding_windows[layer]
    return cache_layout(cfg, layer), num_tokens if window is None else min(num_tokens, window - 1)


def payload_shape(layout: LayerCache, spec: CacheArray, tokens: int, dtype) -> tuple[tuple[int, ...], jnp.dtype]:
    """(shape, dtype) of one array of a layer's payload: [tokens, *per-token shape], or a per-request
    layout's array as it is; the model's dtype unless the array declares its own."""
    return (spec.shape if layout.per_request else (tokens, *spec.shape)), jnp.dtype(spec.dtype or dtype)


@dataclass(frozen=True)
class LayerKVState:
    """One layer's state of one request, as its attention's cache layout declares it (LayerCache):
    kind "paged": k, v, each [num_tokens, KV heads, head_dim]; kind "window": the same arrays for the
    request's last tokens only (`layer_kv_state`); kind "latent" (MLA): latent [num_tokens,
    kv_lora_rank] and k_rope [num_tokens, qk_rope_head_dim]; kind "recurrent" (Gated DeltaNet): conv
    [K-1, conv_dim] and recurrent [value heads, key_head_dim, value_head_dim] fp32."""

    kind: str
    arrays: dict[str, object]  # name -> jax.Array or numpy array

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in self.arrays.values())


@dataclass(frozen=True)
class KVPayload:
    model: str  # the exporting model's name (for messages)
    layout: dict  # kv_layout of the exporting model
    num_tokens: int  # tokens whose KV the payload holds: positions 0 .. num_tokens-1
    layers: tuple[int, ...]  # layer index of each state
    states: tuple[LayerKVState, ...]

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.states)

    def check(self, cfg: ModelConfig, dtype, num_tokens: int) -> None:
        """Raise KVTransferError unless this payload holds every layer's KV of `num_tokens` tokens of
        a model with cfg's KV layout in `dtype`."""
        mine = kv_layout(cfg, dtype)
        differs = {k: (self.layout.get(k), v) for k, v in mine.items() if self.layout.get(k) != v}
        if differs:
            what = ", ".join(f"{k} {a!r} (payload) vs {b!r} (here)" for k, (a, b) in differs.items())
            raise KVTransferError(f"KV payload from {self.model!r} does not fit {cfg.name!r}: {what}")
        if self.num_tokens != num_tokens:
            raise KVTransferError(f"KV payload holds {self.num_tokens} tokens; the request has {num_tokens} "
                                  "computed tokens")
        if tuple(self.layers) != tuple(range(cfg.num_layers)):
            raise KVTransferError(f"KV payload holds layers {list(self.layers)}; importing needs all "
                                  f"{cfg.num_layers} layers of {cfg.name!r}")
        for layer, state in zip(self.layers, self.states):
            layout, tokens = layer_kv_state(cfg, layer, num_tokens)
            names = [a.name for a in layout.arrays]
            if state.kind != layout.kind or set(state.arrays) != set(names):
                raise KVTransferError(f"KV payload layer {layer}: kind {state.kind!r} with arrays "
                                      f"{sorted(state.arrays)}; expected {layout.kind!r} with {' and '.join(names)}")
            for spec in layout.arrays:
                a, (want, want_dtype) = state.arrays[spec.name], payload_shape(layout, spec, tokens, dtype)
                if tuple(a.shape) != want or jnp.dtype(a.dtype) != want_dtype:
                    raise KVTransferError(f"KV payload layer {layer} {spec.name}: shape {list(a.shape)} "
                                          f"{jnp.dtype(a.dtype).name}; expected {list(want)} {want_dtype.name}")


@dataclass
class Handoff:
    """A request leaving one engine after its prefill, with everything another needs to continue it."""

    request_id: int
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # sampled by the prefill engine (its first token)
    params: SamplingParams
    seed: int
    kv: KVPayload
    arrival_time: float = 0.0
    first_token_time: float | None = None
    extra: dict = field(default_factory=dict)
