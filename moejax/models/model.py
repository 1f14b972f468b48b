"""A model ready to run in layer ranges — the interface every executor and schedule uses.

    hidden = model.embed(token_ids)
    hidden, counts = model.run_layers(hidden, kv_caches, meta, start, end)   # any [start, end)
    logits = model.logits(hidden)

A full forward is one range. Each layer is a jitted pure function of (layer params, hidden, layer KV,
metadata); layers with the same structure share one compilation, so a layer range of any length costs
no new compile. The KV buffers are donated: `run_layers` replaces `kv_caches[i]` in place.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import kernels
from moejax.config import ModelConfig
from moejax.meshes import placement as placement_ctx
from moejax.meshes.placement import Placement, constrain
from moejax.models.attention import AttentionMetadata, LayerKV
from moejax.models.decoder import CausalLM
from moejax.models.moe import MoEBlock


ROWS = ("batch", None)  # hidden [T, D]: rows split by request under data parallelism


def _layer_step(graphdef, state, x, kv, meta):
    x, kv, counts = nnx.merge(graphdef, state)(constrain(x, ROWS), kv, meta)
    return constrain(x, ROWS), kv, counts


def _layer_routing(graphdef, state, x, kv, meta):
    layer = nnx.merge(graphdef, state)
    h, kv = layer.attend(x, kv, meta)
    if isinstance(layer.ffn, MoEBlock):
        _, ids = layer.ffn.route(layer.post_attn_norm(h))
    else:
        ids = jnp.full((x.shape[0], 1), -1, jnp.int32)  # no router in a dense layer
    out, _ = layer.feed_forward(h, meta.valid)
    return out, kv, ids


def _io_call(graphdef, method: str, state, x):
    return getattr(nnx.merge(graphdef, state), method)(x)


def _gather_rows(graphdef, state, x_prev, token_ids, extra, rows):
    parts = [p for p in (x_prev, None if token_ids is None else nnx.merge(graphdef, state).embed_tokens(token_ids),
                         extra) if p is not None]
    return constrain(jnp.take(jnp.concatenate(parts), rows, axis=0), ROWS)


def _whole_model(io_def, layer_defs, head, io_state, layer_states, kv, token_ids, meta, rows, head_args):
    """Every layer in one program: embed -> layers -> logits of `rows` -> head(logits, *head_args)."""
    io = nnx.merge(io_def, io_state)
    x = constrain(io.embed_tokens(token_ids), ROWS)
    new_kv, counts = [], []
    for graphdef, state, layer_kv in zip(layer_defs, layer_states, kv):
        x, layer_kv, c = _layer_step(graphdef, state, x, layer_kv, meta)
        new_kv.append(layer_kv)
        counts.append(c)
    return head(io.logits(jnp.take(x, rows, axis=0)), *head_args), new_kv, jnp.stack(counts)


def _logits_at(graphdef, state, hidden, rows):
    return nnx.merge(graphdef, state).logits(jnp.take(hidden, rows, axis=0))


class Model:
    def __init__(self, config: ModelConfig, module: CausalLM, placement: Placement | None = None):
        self.config = config
        self.placement = placement  # the layout + mesh the parameters live on (None: one device)
        self.io_def, self.io_state = nnx.split(module.io)
        split = [nnx.split(layer) for layer in module.layers]
        self.layer_defs = [g for g, _ in split]
        self.layer_states = [s for _, s in split]
        # Layers of equal structure share one compiled function; comparing graphdefs is costly, so
        # each layer's structure class is worked out once here, not per call.
        first_of: dict = {}
        self.layer_kind = [first_of.setdefault(g, i) for i, g in enumerate(self.layer_defs)]
        self._fns: dict[tuple, Callable] = {}

    @property
    def dtype(self) -> jnp.dtype:
        return self.io_state["embed"][...].dtype

    def _fn(self, key: tuple, make: Callable[[], Callable]) -> Callable:
        # The kernel backend is read at trace time, so it is part of the cache key. The placement
        # is fixed per model; calls trace under it (see _call).
        key = (*key, kernels.backend_for())
        if key not in self._fns:
            self._fns[key] = make()
        return self._fns[key]

    def _call(self, fn: Callable, *args):
        with placement_ctx.use(self.placement):
            return fn(*args)

    def embed(self, token_ids: jax.Array) -> jax.Array:
        """[T] int32 -> [T, D]."""
        fn = self._fn(("embed",), lambda: jax.jit(partial(_io_call, self.io_def, "embed_tokens")))
        return self._call(fn, self.io_state, token_ids)

    def gather_rows(self, x_prev: jax.Array | None, token_ids: jax.Array | None, extra: jax.Array | None,
                    rows: jax.Array) -> jax.Array:
        """The hidden rows of a layer group in one op: rows [T] index the concatenation
        [x_prev; embed(token_ids); extra] (any part may be None) -> [T, D]."""
        fn = self._fn(("gather_rows",), lambda: jax.jit(partial(_gather_rows, self.io_def)))
        return self._call(fn, self.io_state, x_prev, token_ids, extra, rows)

    def logits(self, hidden: jax.Array, rows: jax.Array | None = None) -> jax.Array:
        """hidden: [T, D] -> [T, V] fp32 logits, or only those of `rows` ([R] int32) -> [R, V]."""
        if rows is None:
            fn = self._fn(("logits",), lambda: jax.jit(partial(_io_call, self.io_def, "logits")))
            return self._call(fn, self.io_state, hidden)
        fn = self._fn(("logits_at",), lambda: jax.jit(partial(_logits_at, self.io_def)))
        return self._call(fn, self.io_state, hidden, rows)

    def layer(self, i: int, x: jax.Array, kv: LayerKV, meta: AttentionMetadata):
        """One decoder layer: -> (x [T, D], new layer KV, tokens per expert [E])."""
        kind = self.layer_kind[i]
        fn = self._fn(("layer", kind),
                      lambda: jax.jit(partial(_layer_step, self.layer_defs[kind]), donate_argnums=(2,)))
        return self._call(fn, self.layer_states[i], x, kv, meta)

    def forward_all(self, token_ids: jax.Array, kv_caches: list[LayerKV], meta: AttentionMetadata, rows: jax.Array,
                    head: Callable, *head_args) -> tuple[jax.Array, jax.Array]:
        """embed -> all layers -> logits of `rows` -> head(logits, *head_args), as one compiled program
        (one dispatch per iteration: what a decode step needs). Same result as embed / run_layers /
        logits; the KV buffers are donated and replaced in kv_caches.
        -> (head's output, tokens per expert [L, E])."""
        fn = self._fn(("whole", head), lambda: jax.jit(
            partial(_whole_model, self.io_def, tuple(self.layer_defs), head), donate_argnums=(2,)))
        out, kv_caches[:], counts = self._call(fn, self.io_state, self.layer_states, kv_caches, token_ids, meta,
                                               rows, head_args)
        return out, counts

    def layer_routing(self, i: int, x: jax.Array, kv: LayerKV, meta: AttentionMetadata):
        """Layer i, also returning each row's chosen experts -> (x, new layer KV, expert ids [T, K];
        -1 in a dense layer). For recording routing traces; the serving path never pays for it."""
        kind = self.layer_kind[i]
        fn = self._fn(("layer_routing", kind),
                      lambda: jax.jit(partial(_layer_routing, self.layer_defs[kind]), donate_argnums=(2,)))
        return self._call(fn, self.layer_states[i], x, kv, meta)

    def run_layers(self, x: jax.Array, kv_caches: list[LayerKV], meta: AttentionMetadata,
                   start: int = 0, end: int | None = None) -> tuple[jax.Array, list[jax.Array]]:
        """Layers [start, end) on hidden rows x: [T, D] -> (x, tokens per expert per layer: list of [E])."""
        end = self.config.num_layers if end is None else end
        counts = []
        for i in range(start, end):
            x, kv_caches[i], group_sizes = self.layer(i, x, kv_caches[i], meta)
            counts.append(group_sizes)
        return x, counts

    def init_kv_cache(self, num_blocks: int, block_size: int) -> list[LayerKV]:
        """Zeroed paged KV cache: per layer (k, v), each [num_blocks, block_size, KV, head_dim]; under a
        placement, blocks are split by request shard and heads by head shard."""
        c = self.config
        shape = (num_blocks, block_size, c.num_kv_heads, c.head_dim)
        device = None if self.placement is None else self.placement.sharding(("batch", None, "kv_heads", None))
        return [(jnp.zeros(shape, self.dtype, device=device), jnp.zeros(shape, self.dtype, device=device))
                for _ in range(c.num_layers)]

    def params(self) -> nnx.State:
        """All parameters as one state tree: {"io": ..., "layers": {i: ...}} (for saving / inspection)."""
        return nnx.State({"io": self.io_state, "layers": nnx.State(dict(enumerate(self.layer_states)))})


def build_model(config: ModelConfig, seed: int = 0, dtype: str | None = None,
                placement: Placement | None = None) -> Model:
    """A model with seeded random weights (the tiny presets build in seconds). Under a placement the
    weights are generated directly into their shardings (same values as unsharded)."""
    if not config.executable:
        raise ValueError(f"{config.name}: architecture {config.architecture!r} "
                         f"(attention {config.attention_kind!r}) has no executable model yet; "
                         "it can be simulated only")
    dtype = jnp.dtype(dtype or config.dtype)
    if placement is None:
        return Model(config, CausalLM(config, nnx.Rngs(params=seed), dtype=dtype))
    placement.layout.validate(config, placement.mesh.size)
    abstract = nnx.eval_shape(lambda: CausalLM(config, nnx.Rngs(params=seed), dtype=dtype))
    graphdef, state = nnx.split(abstract)
    shardings = jax.tree.map(lambda v: placement.sharding(v.get_metadata("out_sharding", None) or (None,) * v.ndim),
                             state, is_leaf=lambda v: isinstance(v, nnx.Variable))
    make = jax.jit(lambda: nnx.split(CausalLM(config, nnx.Rngs(params=seed), dtype=dtype))[1],
                   out_shardings=shardings)
    return Model(config, nnx.merge(graphdef, make()), placement)
