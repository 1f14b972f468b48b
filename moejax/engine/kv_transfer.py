"""KV hand-off between engines: one request's KV as a typed payload, and the request with it.

A prefill engine finishes a request marked `handoff` after its first token, exporting the KV of its
prompt (every layer, or a range of layers while it prefills); a decode engine admits the request
with that KV (`Engine.add_prefilled`) and continues from its next token. Payloads are checked on
import: a payload of another model or with other shapes is rejected with what differs.

An attention layer's state is its per-token KV ("paged"); a Gated DeltaNet layer's is the request's
fixed-size state slot ("recurrent"), the same size however long the prompt: `layer_state_spec`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import jax.numpy as jnp
import numpy as np

from moejax.config import ModelConfig
from moejax.engine.sampling import SamplingParams


class KVTransferError(ValueError):
    """A KV payload does not fit the engine importing it; the message names what differs."""


def kv_layout(cfg: ModelConfig, dtype) -> dict:
    """What a payload must agree on to be importable: the KV each layer keeps per token."""
    return {"architecture": cfg.architecture, "num_layers": cfg.num_layers, "num_kv_heads": cfg.num_kv_heads,
            "head_dim": cfg.head_dim, "dtype": jnp.dtype(dtype).name, "sliding_windows": list(cfg.sliding_windows),
            "linear_layers": list(cfg.linear_layers)}


def layer_state_spec(cfg: ModelConfig, layer: int, num_tokens: int, dtype) -> tuple[str, dict[str, tuple]]:
    """What a request's state in `layer` is after num_tokens tokens: (kind, {array: (shape, dtype)}).
    "paged": k, v [num_tokens, KV heads, head_dim]; "recurrent" (Gated DeltaNet): conv [K-1, conv_dim]
    (the conv's last inputs, model dtype) and recurrent [value heads, key_head_dim, value_head_dim] fp32."""
    if cfg.linear_layers[layer]:
        s = cfg.linear_attention
        return "recurrent", {"conv": ((s.conv_kernel - 1, s.conv_dim), jnp.dtype(dtype)),
                             "recurrent": ((s.num_value_heads, s.key_head_dim, s.value_head_dim), jnp.dtype("float32"))}
    shape = (num_tokens, cfg.num_kv_heads, cfg.head_dim)
    return "paged", {"k": (shape, jnp.dtype(dtype)), "v": (shape, jnp.dtype(dtype))}


@dataclass(frozen=True)
class LayerKVState:
    """One layer's state of one request, as `layer_state_spec` describes it: kind "paged" (arrays k, v)
    or "recurrent" (arrays conv, recurrent)."""

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
            kind, want = layer_state_spec(cfg, layer, num_tokens, dtype)
            if state.kind != kind or set(state.arrays) != set(want):
                raise KVTransferError(f"KV payload layer {layer}: kind {state.kind!r} with arrays "
                                      f"{sorted(state.arrays)}; expected {kind!r} with {' and '.join(want)}")
            for name, a in state.arrays.items():
                shape, want_dtype = want[name]
                if tuple(a.shape) != shape or jnp.dtype(a.dtype) != want_dtype:
                    raise KVTransferError(f"KV payload layer {layer} {name}: shape {list(a.shape)} "
                                          f"{jnp.dtype(a.dtype).name}; expected {list(shape)} {want_dtype.name}")


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
