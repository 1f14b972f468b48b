"""A model ready to run in layer ranges, or layer by layer in steps -- the interface executors use.

    hidden = model.embed(token_ids)
    hidden, counts = model.run_layers(hidden, kv_caches, meta, start, end)   # any [start, end), fused
    logits = model.logits(hidden)

and a layer in its steps, for executors that hold the routed experts elsewhere (an expert cache in
device memory, another submesh):

    h, kv_caches[i] = model.attend(i, x, kv_caches[i], meta)
    y, weights, ids = model.route(i, h, meta.valid)
    routed          = model.experts(y, ids, weights, model.expert_weights(i))   # or (buffer, slot_of)
    x               = model.combine(i, h, y, routed)

Each piece is a jitted pure function of (params, inputs); layers of equal structure share one
compilation, so a layer range of any length costs no new compile. KV buffers are donated.

Placements are values the model holds (`model.placements`): the attention side (attention, norms,
router, shared experts, embedding, KV cache) traces under `placements.attention`, the routed experts
under `placements.experts`. Colocated, both are one placement and a layer (or a whole decode step,
`forward_all`) is one compiled program.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from functools import partial, wraps

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax import kernels
from moejax.config import ModelConfig
from moejax.meshes.placement import Placement, Placements, constrain
from moejax.models.attention import AttentionMetadata, LayerKV
from moejax.models.decoder import CausalLM, cache_layouts
from moejax.models.layers import ExpertParam
from moejax.models.moe import expert_activation, expert_counts, routed_experts

ROWS = ("batch", None)  # hidden [T, D]: rows split by request under data parallelism
# (w_gate_up [S, D, 2F], w_down [S, F, D]), biased experts (GPT-OSS): + (b_gate_up [S, 2F], b_down [S, D])
ExpertBuffer = tuple[jax.Array, ...]
EXPERT_ARRAYS = ("w_gate_up", "w_down", "b_gate_up", "b_down")  # a buffer's arrays, in order


def _attend(graphdef, placement, state, x, kv, meta):
    h, kv = nnx.merge(graphdef, state).attend(constrain(x, ROWS, placement), kv, meta, placement)
    return constrain(h, ROWS, placement), kv


def _route(graphdef, state, h, valid):
    return nnx.merge(graphdef, state).route(h, valid)


def _combine(graphdef, placement, state, h, y, routed):
    return constrain(nnx.merge(graphdef, state).combine(h, y, routed), ROWS, placement)


def _attention_stage(prev_def, graphdef, placement, prev_state, state, x, kv, meta, prev):
    if prev is not None:  # the previous layer's combine makes this layer's input
        x = _combine(prev_def, placement, prev_state, *prev)
    h, kv = _attend(graphdef, placement, state, x, kv, meta)
    return (h, kv, *_route(graphdef, state, h, meta.valid))


def _require_resident(ids: np.ndarray, slot_of: np.ndarray) -> None:
    E = len(slot_of)
    needed = np.unique(ids[(ids >= 0) & (ids < E)])
    absent = needed[slot_of[needed] < 0]
    if absent.size:
        raise ValueError(f"rows are routed to experts {absent.tolist()} that the expert buffer does not hold "
                         "(slot -1): the executor must load them before the experts run")


def _buffer(experts) -> ExpertBuffer:
    """A layer's routed-expert state as a buffer holding expert e in slot e."""
    return tuple(experts[name][...] for name in EXPERT_ARRAYS if name in experts)


def _experts(placement, check, activation, y, ids, weights, buffer, slot_of):
    if check and slot_of is not None:
        jax.debug.callback(_require_resident, ids, slot_of)
    w_gate_up, w_down, *biases = buffer
    return routed_experts(y, ids, weights, w_gate_up, w_down, slot_of, placement, *biases, activation=activation)


def _layer_step(graphdef, placement, num_experts, activation, state, experts, x, kv, meta):
    """One colocated layer: attend -> route -> all experts -> combine -> (x, kv, tokens per expert [E])."""
    layer = nnx.merge(graphdef, state)
    x = constrain(x, ROWS, placement)
    h, kv = layer.attend(x, kv, meta, placement)
    y, weights, ids = layer.route(h, meta.valid)
    if ids is None:
        return constrain(layer.combine(h, y, None), ROWS, placement), kv, jnp.zeros((num_experts,), jnp.int32)
    w_gate_up, w_down, *biases = _buffer(experts)
    routed = routed_experts(y, ids, weights, w_gate_up, w_down, None, placement, *biases, activation=activation)
    return constrain(layer.combine(h, y, routed), ROWS, placement), kv, expert_counts(ids, num_experts)


def _io_call(graphdef, method: str, state, x):
    return getattr(nnx.merge(graphdef, state), method)(x)


def _gather_rows(graphdef, placement, state, x_prev, token_ids, extra, rows):
    parts = [p for p in (x_prev, None if token_ids is None else nnx.merge(graphdef, state).embed_tokens(token_ids),
                         extra) if p is not None]
    return constrain(jnp.take(jnp.concatenate(parts), rows, axis=0), ROWS, placement)


def _whole_model(io_def, layer_defs, head, placement, num_experts, activation, io_state, layer_states,
                 expert_states, kv, token_ids, meta, rows, head_args):
    """Every layer in one program: embed -> layers -> logits of `rows` -> head(logits, *head_args)."""
    io = nnx.merge(io_def, io_state)
    x, new_kv, counts = _all_layers(layer_defs, placement, num_experts, activation, layer_states, expert_states,
                                    io.embed_tokens(token_ids), kv, meta)
    return head(io.logits(jnp.take(x, rows, axis=0)), *head_args), new_kv, counts


def _all_layers(layer_defs, placement, num_experts, activation, layer_states, expert_states, x, kv, meta):
    """x through every layer -> (x, new KV per layer, tokens per expert [L, E])."""
    new_kv, counts = [], []
    for graphdef, state, experts, layer_kv in zip(layer_defs, layer_states, expert_states, kv):
        x, layer_kv, c = _layer_step(graphdef, placement, num_experts, activation, state, experts, x, layer_kv, meta)
        new_kv.append(layer_kv)
        counts.append(c)
    return x, new_kv, jnp.stack(counts)


def _decode_steps(io_def, layer_defs, sampler, placement, num_experts, activation, max_steps, attention_layers,
                  io_state, layer_states, expert_states, kv, token_ids, meta, num_steps, sampling, stop_ids, remaining):
    """Up to `num_steps` decode steps of rows that each hold one sequence's last token, in one program:
    embed -> layers -> logits -> sampler -> the next step's input, KV appended each step. A row stops
    after the token that is one of its stop ids, or when `remaining` tokens are out; stopped rows
    turn into padding (no KV written, no expert reached). -> (tokens [max_steps, R], -1 after a row
    stopped; (tokens per expert summed over the steps [L, E], experts activated summed over the steps [L]))."""
    io = nnx.merge(io_def, io_state)
    paged = [kv[i] for i in attention_layers]  # Gated DeltaNet layers hold state slots, not blocks
    block_size = paged[0][0].shape[1]
    num_slots = max(k.shape[0] for k, _ in paged) * block_size  # past every layer's cache (window pools are smaller)
    temperature, top_k, top_p, seeds, output_index = sampling
    R = token_ids.shape[0]

    def step(carry):
        j, tokens, kv, done, out, counts = carry
        valid = meta.valid & ~done
        m = meta.advance(j, valid, block_size, num_slots)
        x, new_kv, layer_counts = _all_layers(layer_defs, placement, num_experts, activation, layer_states,
                                              expert_states, io.embed_tokens(tokens), kv, m)
        sampled = sampler(io.logits(x), temperature, top_k, top_p, seeds, output_index + j)
        stop = jnp.any(sampled[:, None] == stop_ids, axis=1) | (j + 1 >= remaining)
        return (j + 1, jnp.where(valid, sampled, tokens), new_kv, done | (valid & stop),
                out.at[j].set(jnp.where(valid, sampled, -1)),
                (counts[0] + layer_counts, counts[1] + (layer_counts > 0).sum(axis=1)))

    L = len(layer_defs)
    carry = (jnp.int32(0), token_ids, kv, ~meta.valid, jnp.full((max_steps, R), -1, jnp.int32),
             (jnp.zeros((L, num_experts), jnp.int32), jnp.zeros((L,), jnp.int32)))
    _, _, kv, _, out, counts = jax.lax.while_loop(
        lambda c: (c[0] < num_steps) & ~jnp.all(c[3]), step, carry)
    # Replicated, so every process of a multi-host mesh can read the tokens and counts.
    out, counts = jax.tree.map(lambda a: constrain(a, (None,) * a.ndim, placement), (out, counts))
    return out, kv, counts


def _on_params(fn: Callable, param_def) -> Callable:
    """fn(io_state, layer_states, expert_states, *args) as a function of the flattened parameters."""
    return lambda leaves, *args: fn(*jax.tree.unflatten(param_def, leaves), *args)


def _under(context: Callable, fn: Callable) -> Callable:
    """fn traced inside context()."""
    @wraps(fn)
    def traced(*args, **kwargs):
        with context():
            return fn(*args, **kwargs)
    return traced


def _logits_at(graphdef, state, hidden, rows):
    return nnx.merge(graphdef, state).logits(jnp.take(hidden, rows, axis=0))


class Model:
    def __init__(self, config: ModelConfig, module: CausalLM, placements: Placements = Placements()):
        self.config = config
        self.placements = placements
        self.io_def, self.io_state = nnx.split(module.io)
        split = [nnx.split(layer) for layer in module.layers]
        self.layer_defs = [g for g, _ in split]
        self.layer_states = [s for _, s in split]
        # MoE layer i's routed experts (None for a dense layer), apart from the layer's own state.
        self.expert_states = [None if e is None else nnx.state(e) for e in module.experts]
        # Layers of equal structure share one compiled function; comparing graphdefs is costly, so
        # each layer's structure class is worked out once here, not per call.
        first_of: dict = {}
        self.layer_kind = [first_of.setdefault(g, i) for i, g in enumerate(self.layer_defs)]
        self.check_experts = os.environ.get("MOEJAX_DEBUG", "") not in ("", "0")  # see experts()
        self.expert_activation = expert_activation(config)
        # Every parameter array, flattened once: the whole-model programs take these leaves, as
        # flattening the nnx states at each dispatch cost more than the rest of the call.
        self._param_leaves, self._param_def = jax.tree.flatten((self.io_state, self.layer_states, self.expert_states))
        self._fns: dict[tuple, Callable] = {}
        # Projections, norms and router run on the attention side; sharded there, GSPMD partitions them
        self._for_gspmd = placements.attention is not None and placements.attention.mesh.size > 1

    @property
    def dtype(self) -> jnp.dtype:
        return self.io_state["embed"][...].dtype

    @property
    def placement(self) -> Placement | None:
        """The placement of a colocated model (attention and experts on one mesh)."""
        if not self.placements.colocated:
            raise ValueError(f"{self.config.name} places attention and experts on different devices: "
                             "use model.placements.attention / .experts")
        return self.placements.attention

    def _fn(self, key: tuple, make: Callable[[], Callable], **jit_kwargs) -> Callable:
        """The compiled program `key`: make() jitted on first use (jit_kwargs: jax.jit's), traced inside
        kernels.for_gspmd() where the attention side is sharded."""
        # The kernel backend is read at trace time, so it is part of the cache key; placements are
        # fixed per model and bound into each function.
        key = (*key, kernels.backend_for())
        if key not in self._fns:
            fn = make()
            if self._for_gspmd:
                fn = _under(kernels.for_gspmd, fn)
            self._fns[key] = jax.jit(fn, **jit_kwargs)
        return self._fns[key]

    # --- tokens in, logits out ------------------------------------------------------------------------
    def embed(self, token_ids: jax.Array) -> jax.Array:
        """[T] int32 -> [T, D]."""
        return self._fn(("embed",), lambda: partial(_io_call, self.io_def, "embed_tokens"))(
            self.io_state, token_ids)

    def gather_rows(self, x_prev: jax.Array | None, token_ids: jax.Array | None, extra: jax.Array | None,
                    rows: jax.Array) -> jax.Array:
        """The hidden rows of a layer group in one op: rows [T] index the concatenation
        [x_prev; embed(token_ids); extra] (any part may be None) -> [T, D]."""
        fn = self._fn(("gather_rows",), lambda: partial(_gather_rows, self.io_def, self.placements.attention))
        return fn(self.io_state, x_prev, token_ids, extra, rows)

    def logits(self, hidden: jax.Array, rows: jax.Array | None = None) -> jax.Array:
        """hidden: [T, D] -> [T, V] fp32 logits, or only those of `rows` ([R] int32) -> [R, V]."""
        if rows is None:
            return self._fn(("logits",), lambda: partial(_io_call, self.io_def, "logits"))(
                self.io_state, hidden)
        return self._fn(("logits_at",), lambda: partial(_logits_at, self.io_def))(
            self.io_state, hidden, rows)

    # --- a layer in steps -----------------------------------------------------------------------------
    def attend(self, i: int, x: jax.Array, kv: LayerKV, meta: AttentionMetadata) -> tuple[jax.Array, LayerKV]:
        """Layer i's attention block: x [T, D] -> (h = x + attention, new layer KV; kv is donated)."""
        kind = self.layer_kind[i]
        fn = self._fn(("attend", kind), lambda: partial(_attend, self.layer_defs[kind], self.placements.attention),
                      donate_argnums=(2,))
        return fn(self.layer_states[i], x, kv, meta)

    def route(self, i: int, h: jax.Array, valid: jax.Array):
        """Layer i's router: h [T, D] -> (y = norm(h) [T, D], weights [T, K] fp32, expert ids [T, K]
        with E for padding rows); weights and ids are None in a dense layer."""
        kind = self.layer_kind[i]
        fn = self._fn(("route", kind), lambda: partial(_route, self.layer_defs[kind]))
        return fn(self.layer_states[i], h, valid)

    def expert_weights(self, i: int) -> ExpertBuffer:
        """MoE layer i's routed experts as a buffer holding expert e in slot e: (w_gate_up, w_down), and
        (b_gate_up, b_down) after them for biased experts."""
        state = self.expert_states[i]
        if state is None:
            raise ValueError(f"layer {i} of {self.config.name} is dense: it has no routed experts")
        return _buffer(state)

    def experts(self, y: jax.Array, ids: jax.Array, weights: jax.Array, buffer: ExpertBuffer,
                slot_of: jax.Array | None = None) -> jax.Array:
        """Routed experts of rows y [T, D] (ids / weights [T, K]) computed with the experts of `buffer`
        ([S, D, 2F], [S, F, D], and for biased experts [S, 2F], [S, D]); slot_of [E] names each expert's
        slot or -1 (None: slot e is expert e). Every expert a valid row needs must be in the buffer;
        with MOEJAX_DEBUG=1 a missing one is an error (checked on the host, so only in debug mode)."""
        want = EXPERT_ARRAYS[:4 if self.config.expert_bias else 2]
        if len(buffer) != len(want):
            raise ValueError(f"expert buffer of {len(buffer)} arrays; {self.config.name}'s experts need "
                             f"{len(want)}: {', '.join(want)}")
        fn = self._fn(("experts", slot_of is None, self.check_experts), lambda: partial(
            _experts, self.placements.experts, self.check_experts, self.expert_activation))
        return fn(y, ids, weights, tuple(buffer), slot_of)

    def combine(self, i: int, h: jax.Array, y: jax.Array, routed: jax.Array | None) -> jax.Array:
        """Layer i's output from its attention output h, normed rows y and routed-expert output."""
        kind = self.layer_kind[i]
        fn = self._fn(("combine", kind, routed is None),
                      lambda: partial(_combine, self.layer_defs[kind], self.placements.attention))
        return fn(self.layer_states[i], h, y, routed)

    def attention_stage(self, i: int, x: jax.Array, kv: LayerKV, meta: AttentionMetadata, prev=None):
        """Layer i-1's combine (prev: its (h, y, routed); None: x is layer i's input) -> layer i's attend
        and route, as one program (what an executor with the experts elsewhere runs between two
        exchanges) -> (h, new layer KV (kv donated), y, weights, ids)."""
        kind, prev_kind = self.layer_kind[i], self.layer_kind[i - 1] if prev is not None else None
        fn = self._fn(("stage", prev_kind, kind, prev is not None and prev[2] is None), lambda: partial(
            _attention_stage, None if prev is None else self.layer_defs[prev_kind], self.layer_defs[kind],
            self.placements.attention), donate_argnums=(3,))
        prev_state = self.layer_states[i - 1] if prev is not None else None
        return fn(prev_state, self.layer_states[i], x, kv, meta, prev)

    # --- fused layers (colocated) ---------------------------------------------------------------------
    def layer(self, i: int, x: jax.Array, kv: LayerKV, meta: AttentionMetadata):
        """One decoder layer as one program: -> (x [T, D], new layer KV, tokens per expert [E])."""
        kind = self.layer_kind[i]
        fn = self._fn(("layer", kind), lambda: partial(
            _layer_step, self.layer_defs[kind], self.placement, max(self.config.num_experts, 1),
            self.expert_activation), donate_argnums=(3,))
        return fn(self.layer_states[i], self.expert_states[i], x, kv, meta)

    def forward_all(self, token_ids: jax.Array, kv_caches: list[LayerKV], meta: AttentionMetadata, rows: jax.Array,
                    head: Callable, *head_args) -> tuple[jax.Array, jax.Array]:
        """embed -> all layers -> logits of `rows` -> head(logits, *head_args), as one compiled program
        (one dispatch per iteration: what a decode step needs). Same result as embed / run_layers /
        logits; the KV buffers are donated and replaced in kv_caches.
        -> (head's output, tokens per expert [L, E])."""
        fn = self._fn(("whole", head), lambda: _on_params(
            partial(_whole_model, self.io_def, tuple(self.layer_defs), head, self.placement,
                    max(self.config.num_experts, 1), self.expert_activation), self._param_def),
            donate_argnums=(1,))
        out, kv_caches[:], counts = fn(self._param_leaves, kv_caches, token_ids, meta, rows, head_args)
        return out, counts

    def decode_steps(self, token_ids: jax.Array, kv_caches: list[LayerKV], meta: AttentionMetadata,
                     num_steps: jax.Array, max_steps: int, sampler: Callable, sampling: tuple, stop_ids: jax.Array,
                     remaining: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Up to num_steps (<= max_steps, static) decode steps in one compiled program, for rows that
        each hold one sequence's next input token (meta: their first step). sampling: the sampler's
        per-row columns (temperature, top_k, top_p, seed, output index of the first step's token);
        stop_ids [R, S] (-1: none) and remaining [R] (tokens each row may still produce) end a row.
        The KV buffers are donated and replaced in kv_caches.
        -> (tokens [max_steps, R], -1 once a row has stopped; (tokens per expert [L, E], experts
        activated [L]), both summed over the steps)."""
        fn = self._fn(("decode_steps", sampler, max_steps), lambda: _on_params(
            partial(_decode_steps, self.io_def, tuple(self.layer_defs), sampler, self.placement,
                    max(self.config.num_experts, 1), self.expert_activation, max_steps,
                    tuple(i for i, linear in enumerate(self.config.linear_layers) if not linear)), self._param_def),
            donate_argnums=(1,))
        out, kv_caches[:], counts = fn(self._param_leaves, kv_caches, token_ids, meta, num_steps, sampling, stop_ids,
                                       remaining)
        return out, counts

    def run_layers(self, x: jax.Array, kv_caches: list[LayerKV], meta: AttentionMetadata,
                   start: int = 0, end: int | None = None) -> tuple[jax.Array, list[jax.Array]]:
        """Layers [start, end) on hidden rows x: [T, D] -> (x, tokens per expert per layer: list of [E])."""
        end = self.config.num_layers if end is None else end
        if not 0 <= start <= end <= self.config.num_layers:
            raise ValueError(f"layers [{start}, {end}) are not a range of {self.config.name}'s "
                             f"{self.config.num_layers} layers")
        counts = []
        for i in range(start, end):
            x, kv_caches[i], group_sizes = self.layer(i, x, kv_caches[i], meta)
            counts.append(group_sizes)
        return x, counts

    def layer_routing(self, i: int, x: jax.Array, kv: LayerKV, meta: AttentionMetadata):
        """Layer i in steps, also returning each row's chosen experts and the rows the router saw ->
        (x, new layer KV, expert ids [T, K] (-1 in a dense layer), h [T, D]: x + attention, the
        router's input before its norm). For recording routing traces and predictor features; the
        serving path never pays for it."""
        h, kv = self.attend(i, x, kv, meta)
        y, weights, ids = self.route(i, h, meta.valid)
        if ids is None:
            return self.combine(i, h, y, None), kv, jnp.full((x.shape[0], 1), -1, jnp.int32), h
        return self.combine(i, h, y, self.experts(y, ids, weights, self.expert_weights(i))), kv, ids, h

    def init_kv_cache(self, num_blocks: int | Sequence[int], block_size: int, state_slots: int = 0) -> list[LayerKV]:
        """Zeroed KV cache: per layer the arrays its token mixer declares (`cache_layouts`), each
        [num_blocks, block_size, *per-token shape] -- GQA: k, v [.., KV, head_dim]; MLA: latent [.., r],
        k_rope [.., rope] -- or, per request (Gated DeltaNet), [state_slots, *shape]: conv [.., K-1,
        conv_dim], recurrent [.., Hv, dk, dv] fp32. num_blocks: one count for every layer, or one per
        layer (a window-aware cache gives window layers fewer; a Gated DeltaNet layer's is unused).
        Under a placement, blocks are split by request shard, heads by head shard; state slots are
        replicated (any request shard's request may hold any slot)."""
        c = self.config
        if c.has_state_slots and state_slots < 1:
            raise ValueError(f"{c.name} has Gated DeltaNet layers: its cache needs state_slots >= 1 "
                             f"(one per running request), got {state_slots}")
        per_layer = [num_blocks] * c.num_layers if isinstance(num_blocks, int) else list(num_blocks)
        if len(per_layer) != c.num_layers:
            raise ValueError(f"init_kv_cache: {len(per_layer)} block counts for {c.num_layers} layers")
        p = self.placements.attention

        def zeros(a, lead, lead_axes):  # committed, like the parameters: the programs' outputs are, and a
            # jit keyed on uncommitted arrays at the first call would compile again for its own outputs
            device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0]) if p is None \
                else p.sharding((*lead_axes, *a.axes))
            return jnp.zeros((*lead, *a.shape), a.dtype or self.dtype, device=device)

        return [tuple(zeros(a, (state_slots,), (None,)) if layer.per_request else
                      zeros(a, (n, block_size), ("batch", None)) for a in layer.arrays)
                for n, layer in zip(per_layer, cache_layouts(c))]

    def params(self) -> nnx.State:
        """All parameters as one state tree: {"io", "layers": {i}, "experts": {i}} (saving / inspection)."""
        return nnx.State({"io": self.io_state, "layers": nnx.State(dict(enumerate(self.layer_states))),
                          "experts": nnx.State({i: s for i, s in enumerate(self.expert_states) if s is not None})})


def variable_sharding(var: nnx.Variable, placements: Placements) -> jax.sharding.Sharding:
    """Where a parameter lives: routed experts on the expert placement, the rest on the attention
    placement, by their logical axes (no placement: the first device)."""
    p = placements.experts if isinstance(var, ExpertParam) else placements.attention
    if p is None:
        return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return p.sharding(var.get_metadata("out_sharding", None) or (None,) * len(var.shape))


def build_model(config: ModelConfig, seed: int = 0, dtype: str | None = None,
                placements: Placements = Placements()) -> Model:
    """A model with seeded random weights (the tiny presets build in seconds). Under placements the
    weights are generated directly into their shardings (same values as unsharded)."""
    if not config.executable:
        raise ValueError(f"{config.name}: architecture {config.architecture!r} "
                         f"(attention {config.attention_kind!r}) has no executable model yet; "
                         "it can be simulated only")
    dtype = jnp.dtype(dtype or config.dtype)
    if placements.attention is None and placements.experts is None:
        return Model(config, CausalLM(config, nnx.Rngs(params=seed), dtype=dtype))
    placements.validate(config)

    def init(side: int):  # one program per side: a program cannot span the two sides' meshes when apart
        return nnx.split(CausalLM(config, nnx.Rngs(params=seed), dtype=dtype), ExpertParam, ...)[1 + side]

    graphdef, *abstract = nnx.split(nnx.eval_shape(lambda: CausalLM(config, nnx.Rngs(params=seed), dtype=dtype)),
                                    ExpertParam, ...)
    states = [jax.jit(partial(init, side), out_shardings=jax.tree.map(
        lambda v: variable_sharding(v, placements), abstract[side], is_leaf=lambda v: isinstance(v, nnx.Variable)))()
        for side in (0, 1)]
    return Model(config, nnx.merge(graphdef, *states), placements)
