"""Runs IterationPlans with the real model on one device mesh.

A host loop over the plan's layer groups: for each group, gather its rows' hidden states (carried
from the previous group, freshly embedded, or kept from an earlier iteration), build the attention
metadata, run the group's layers. Row counts are padded to power-of-two buckets, so steady state
compiles nothing. Everything is dispatched asynchronously; the only host sync is reading the sampled
tokens and the per-layer expert counts at the end.

KV hand-off: `export_kv` reads one request's KV out of its blocks (every layer; one program per KV
group, one transfer to the host) as a KVPayload; plans carry payloads to import into a request's blocks.

Hybrid models (sliding-window and full-attention layers) keep a pool of blocks per KV group
(kv_cache.kv_groups): the window layers' caches are smaller, and each iteration's attention metadata
carries every group's block tables. Gated DeltaNet layers (Qwen3-Next) keep a request's state in its
state slot instead of blocks: the plan names the slot, the metadata maps rows to it, the layers read
and write it, and hand-off moves the slot's contents (kind "recurrent").
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from moejax.engine.kv_cache import group_blocks, kv_groups, kv_pool_blocks, state_slots_for
from moejax.engine.kv_transfer import KVPayload, LayerKVState, kv_layout, layer_kv_state
from moejax.engine.metadata import attention_metadata, bucket, pad_tokens, to_device
from moejax.engine.plan import IterationPlan, StepResult
from moejax.engine.sampling import TokenLogprobs, sample, sample_with_logprobs
from moejax.engine.traffic import layer_stats, routed_expert_bytes
from moejax.models.decoder import cache_layouts
from moejax.models.model import Model


@jax.jit
def _scatter_rows(pool: jax.Array, x: jax.Array, src: jax.Array, dst: jax.Array) -> jax.Array:
    return pool.at[dst].set(jnp.take(x, src, axis=0), mode="drop")


@jax.jit
def _read_kv(kv: list, slots: jax.Array) -> list:
    """Each given layer's cache arrays at flat cache slots [n] -> per layer a tuple of [n, ...]."""
    return [tuple(c.reshape(-1, *c.shape[2:])[slots] for c in layer) for layer in kv]


@partial(jax.jit, donate_argnums=(0,))
def _write_kv(kv: list, slots: jax.Array, values: list) -> list:
    """values (per layer a tuple of [n, ...]) into each given layer's cache at flat slots [n] (out of
    range: dropped)."""
    return [tuple(c.reshape(-1, *c.shape[2:]).at[slots].set(x.astype(c.dtype), mode="drop").reshape(c.shape)
                  for c, x in zip(layer, v)) for layer, v in zip(kv, values)]


@jax.jit
def _read_states(states: list, slot: jax.Array) -> list:
    """Every Gated DeltaNet layer's (conv, recurrent) state in one state slot."""
    return [tuple(a[slot] for a in layer) for layer in states]


@partial(jax.jit, donate_argnums=(0,))
def _write_states(states: list, slot: jax.Array, values: list) -> list:
    return [tuple(a.at[slot].set(x.astype(a.dtype)) for a, x in zip(layer, v)) for layer, v in zip(states, values)]


class HiddenStash:
    """Hidden rows of slices that stopped before the last layer, kept on device between iterations
    (layered prefill keeps a whole prompt here while it crosses the layer groups). One pool [P, D]
    with rows handed out per request, so gathering from it never changes shapes. `sharding` places the
    pool and the row indices (None: uncommitted)."""

    def __init__(self, hidden_size: int, dtype, sharding=None):
        self.sharding = sharding
        self.pool = jnp.zeros((0, hidden_size), dtype, device=sharding)
        self._rows: dict[int, np.ndarray] = {}
        self._free: list[int] = []

    def reserve(self, rows: int) -> None:
        """Hold at least `rows` rows (the most the policy keeps at once) from now on: a pool that grows
        later changes the shape of the functions reading it, which then compile again."""
        if rows > self.pool.shape[0]:
            self._grow(rows - self.pool.shape[0])

    def rows(self, request_id: int) -> np.ndarray:
        return self._rows[request_id]

    def put(self, request_id: int, x: jax.Array, src_rows: np.ndarray) -> None:
        n = len(src_rows)
        if len(self._rows.get(request_id, ())) != n:
            self.release(request_id)
            if len(self._free) < n:
                self._grow(n - len(self._free))
            self._free.sort()
            self._rows[request_id], self._free = np.array(self._free[:n]), self._free[n:]
        size = bucket(n)
        P = self.pool.shape[0]
        src = np.pad(src_rows, (0, size - n)).astype(np.int32)
        dst = np.pad(self._rows[request_id], (0, size - n), constant_values=P).astype(np.int32)  # P: dropped
        self.pool = _scatter_rows(self.pool, x, to_device(src, self.sharding), to_device(dst, self.sharding))

    def release(self, request_id: int) -> None:
        self._free.extend(self._rows.pop(request_id, np.array([], int)).tolist())

    def _grow(self, extra: int) -> None:
        P = self.pool.shape[0]
        new_size = bucket(P + extra, minimum=64)
        extra_rows = jnp.zeros((new_size - P, self.pool.shape[1]), self.pool.dtype, device=self.sharding)
        self.pool = jnp.concatenate([self.pool, extra_rows])
        self._free.extend(range(P, new_size))


@dataclass
class RowMap:
    """Where the rows of a group's slices sit in its padded row set."""

    offsets: dict[int, int]  # slice index -> its first row
    positions: np.ndarray  # [T]
    seq_ids: np.ndarray  # [T]
    valid: np.ndarray  # [T]


def _last_tokens(tokens: jax.Array, step: jax.Array, rows: jax.Array) -> jax.Array:
    """Row r's input token of a run-ahead iteration: tokens[step, rows[r]] of the iteration before
    it (tokens [max_steps, R]; -1 where a row stopped: its output is dropped, 0 stands in)."""
    return jnp.maximum(tokens[step, rows], 0)


@dataclass
class Launched:
    """A multi-step decode dispatched (JaxExecutor.launch), its tokens still on the device."""

    plan: IterationPlan
    rows: dict[int, int]  # request id -> its row
    tokens: jax.Array  # [max_steps, R], -1 once a row stopped
    counts: tuple  # (tokens per expert [L, E], experts activated [L]), summed over the steps
    t0: float  # when it was dispatched


# Decode steps one multi-step program runs at most (fewer when a request is waiting to be admitted, see
# Scheduler._decode_steps, or when they would take longer than Engine.max_iteration_s): fewer iterations,
# less host and dispatch time per token (benchmarks/decode_settings.py compares 16 and 32); streaming
# deltas come up to this many tokens at a time.
MAX_DECODE_STEPS = 32


class JaxExecutor:
    """Runs plans on the model's placement. Under data parallelism the rows of each group are laid out
    shard-major (each request shard's rows together, every shard padded to the same bucket), so each
    shard attends over the KV blocks it owns."""

    pricer = None  # no cost model: it measures
    splits_experts = False  # runs a model whose routed experts sit on devices apart (moejax.disagg)

    def __init__(self, model: Model, num_blocks: int | tuple[int, ...], block_size: int, max_model_len: int,
                 fuse: bool = True, max_decode_steps: int = MAX_DECODE_STEPS, state_slots: int = 0):
        """num_blocks: blocks of each KV group (kv_cache.kv_groups), or one count for every group.
        fuse: run iterations whose slices all cross every layer as one compiled program (else layer by
        layer, as every other iteration runs). max_decode_steps: the most decode steps one program runs
        (decode-only iterations; 1 = one step per iteration). state_slots: per-request state slots of
        Gated DeltaNet layers (one per request the scheduler runs at once)."""
        self.fuse = fuse
        self.max_decode_steps = max_decode_steps if fuse else 1
        self._finished_at = 0.0  # when the last launched iteration was collected (finish)
        self.model = model
        self.config = model.config
        self.kv_dtype = model.dtype
        self.max_model_len = max_model_len
        self.kv_groups = kv_groups(model.config)
        self.group_num_blocks = (num_blocks,) * len(self.kv_groups) if isinstance(num_blocks, int) else num_blocks
        self.num_blocks = max(self.group_num_blocks)  # a padding row's slot lies past every pool
        self.block_size = block_size
        if not model.placements.colocated and not self.splits_experts:
            raise ValueError(f"{model.config.name} is placed by an attention/experts split layout (disjoint devices): "
                             f"executor {type(self).__name__} runs one mesh; use executor='disagg'")
        placement = model.placements.attention  # where the rows, the KV cache and the attention side live
        self.row_shards = placement.shards("batch") if placement else 1
        self.max_blocks_per_seq = math.ceil(max_model_len / block_size)
        per_layer = [0] * model.config.num_layers
        for group, n in zip(self.kv_groups, self.group_num_blocks):
            for i in group.layers:
                per_layer[i] = n
        self.num_state_slots = state_slots
        self.kv = model.init_kv_cache(per_layer, block_size, state_slots)
        self.state_layers = [i for i, linear in enumerate(model.config.linear_layers) if linear]
        self._sharding = placement.sharding if placement else None
        # Inputs with no layout axis (token ids, row indices, sampling columns) are replicated. In one
        # process they stay uncommitted and jit places them; on a mesh over several processes (one per
        # host) jit takes global arrays only.
        self._replicated = placement.sharding(()) if placement and placement.mesh.is_multi_process else None
        self.stash = HiddenStash(model.config.hidden_size, model.dtype, self._replicated)
        # A multi-step decode's token ids come from the host or, run ahead, from the iteration before on
        # the device: committed to one placement either way, so that both meet one compiled program.
        self._token_sharding = placement.sharding(()) if placement else \
            jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        self._last_tokens = jax.jit(_last_tokens, out_shardings=self._token_sharding)

    def attach(self, policy) -> None:
        """Size the stash for the hidden rows the policy keeps between iterations."""
        self.stash.reserve(policy.max_kept_rows(self.max_model_len))

    # --- KV hand-off ----------------------------------------------------------------------------------
    def _slots(self, block_ids: tuple[int, ...], first: int, num_tokens: int) -> np.ndarray:
        """Flat cache slots of tokens first .. num_tokens-1, padded to a bucket with an out-of-range slot."""
        t = np.arange(first, num_tokens)
        slots = np.asarray(block_ids, np.int64)[t // self.block_size] * self.block_size + t % self.block_size
        return np.pad(slots, (0, bucket(len(t)) - len(t)),
                      constant_values=self.num_blocks * self.block_size).astype(np.int32)

    def _group_spans(self, tables: tuple[tuple[int, ...], ...], num_tokens: int):
        """(layers, block table, first token, token count) of each KV group's part of a payload."""
        for group, table in zip(self.kv_groups, tables):
            _, n = layer_kv_state(self.config, group.layers[0], num_tokens)
            yield group.layers, table, num_tokens - n, n

    def export_kv(self, block_ids: tuple[int, ...], num_tokens: int,
                  group_block_ids: tuple[tuple[int, ...], ...] = (), state_slot: int | None = None,
                  layers: range | None = None) -> KVPayload:
        """The KV of a request's first num_tokens tokens in its blocks (`block_ids`, and the other
        KV groups' tables for a hybrid model), every layer (or only `layers`: a prefill streaming the
        layers it has finished), on the host: per layer the arrays its attention caches (k, v; MLA:
        latent, k_rope); a sliding-window layer's only for the last tokens its next token sees; a Gated
        DeltaNet layer's state in `state_slot`."""
        cfg = self.config
        wanted = set(range(cfg.num_layers) if layers is None else layers)
        state_layers = [i for i in self.state_layers if i in wanted]
        if state_layers and state_slot is None:
            raise ValueError(f"{cfg.name} keeps Gated DeltaNet state in state slots: export_kv needs the "
                             "request's state_slot")
        spans = [(tuple(i for i in group if i in wanted), *rest)
                 for group, *rest in self._group_spans((block_ids, *group_block_ids), num_tokens)]
        spans = [span for span in spans if span[0]]
        values = jax.device_get([_read_kv([self.kv[i] for i in group], to_device(
            self._slots(table, first, num_tokens), self._replicated)) for group, table, first, _ in spans])
        states = {}
        for (group, _, _, n), group_values in zip(spans, values):
            for i, arrays in zip(group, group_values):
                layout, _ = layer_kv_state(cfg, i, num_tokens)
                states[i] = LayerKVState(layout.kind, {a.name: np.asarray(x)[:n] for a, x in zip(layout.arrays, arrays)})
        if state_layers:
            slot_states = jax.device_get(_read_states([self.kv[i] for i in state_layers], np.int32(state_slot)))
            for i, arrays in zip(state_layers, slot_states):
                layout, _ = layer_kv_state(cfg, i, num_tokens)
                states[i] = LayerKVState(layout.kind, {a.name: x for a, x in zip(layout.arrays, arrays)})
        return KVPayload(cfg.name, kv_layout(cfg, self.model.dtype), num_tokens, tuple(sorted(states)),
                         tuple(states[i] for i in sorted(states)))

    def import_kv(self, block_ids: tuple[int, ...], payload: KVPayload,
                  group_block_ids: tuple[tuple[int, ...], ...] = (), state_slot: int | None = None) -> None:
        """Write a payload's KV into a request's blocks, its Gated DeltaNet states into `state_slot`
        (checked against this model first)."""
        payload.check(self.config, self.model.dtype, payload.num_tokens)
        spans = list(self._group_spans((block_ids, *group_block_ids), payload.num_tokens))
        layouts = cache_layouts(self.config)
        for layers, table, first, n in spans:
            pad = bucket(n) - n
            values = [tuple(np.pad(np.asarray(payload.states[i].arrays[a.name]), [(0, pad)] + [(0, 0)] * len(a.shape))
                            for a in layouts[i].arrays) for i in layers]
            written = _write_kv([self.kv[i] for i in layers],
                                to_device(self._slots(table, first, payload.num_tokens), self._replicated),
                                to_device(values, self._replicated))
            for i, layer_kv in zip(layers, written):
                self.kv[i] = layer_kv
        if self.state_layers:
            values = [tuple(np.asarray(payload.states[i].arrays[a.name]) for a in layouts[i].arrays)
                      for i in self.state_layers]
            written = _write_states([self.kv[i] for i in self.state_layers], np.int32(state_slot),
                                    to_device(values, self._replicated))
            for i, layer_kv in zip(self.state_layers, written):
                self.kv[i] = layer_kv

    def execute(self, plan: IterationPlan) -> StepResult:
        if plan.decode_steps > 1:
            return self.finish(self.launch(plan))
        t0 = time.perf_counter()
        self._release_and_import(plan)
        L, E = self.config.num_layers, max(self.config.num_experts, 1)
        if not plan.slices:
            return self._result(plan, {}, np.zeros((L, E), np.int64), t0)

        seq_of = {rid: i for i, rid in enumerate(plan.block_tables)}
        tables = self._tables(plan, seq_of)
        whole = plan.groups[0]
        head = sample_with_logprobs if any(r.logprobs for r in plan.sampling) else sample
        if self.fuse and len(plan.groups) == 1 and (whole.layer_start, whole.layer_end) == (0, L):
            out, counts = self._run_whole_model(plan, seq_of, tables, head)
        else:
            out, counts = self._run_groups(plan, seq_of, tables, head)
        out, expert_tokens = jax.device_get((out, counts))
        host_tokens = out if head is sample else out[0]
        sampled = {row.request_id: int(t) for row, t in zip(plan.sampling, host_tokens)}
        result = self._result(plan, sampled, expert_tokens, t0)
        if head is sample_with_logprobs:
            result.logprobs = _logprobs_of(plan, *out[1:])
        return result

    def _release_and_import(self, plan: IterationPlan) -> None:
        for rid in plan.released:
            self.stash.release(rid)
        for rid, block_ids, payload in plan.kv_imports:
            self.import_kv(block_ids, payload, plan.group_block_tables.get(rid, ()), plan.state_slots.get(rid))

    def _tables(self, plan: IterationPlan, seq_of: dict[int, int]):
        """The block tables of the plan's requests [S, max_blocks] (KV group 0), and of the other KV
        groups' (one per window); freed entries (-1) point at block 0, never read; each request's state
        slot [S] (None without Gated DeltaNet layers)."""
        groups = [(None, plan.block_tables)] + [
            (g.window, {rid: plan.group_block_tables[rid][j] for rid in seq_of})
            for j, g in enumerate(self.kv_groups[1:])]
        out = []
        for _, per_request in groups:
            tables = np.zeros((len(seq_of), self.max_blocks_per_seq), np.int32)
            for rid, i in seq_of.items():
                blocks = per_request[rid]
                tables[i, :len(blocks)] = blocks
            out.append(np.maximum(tables, 0))
        slots = None
        if self.num_state_slots:
            slots = np.zeros(len(seq_of), np.int32)
            for rid, i in seq_of.items():
                slots[i] = plan.state_slots[rid]
        return out[0], {w: t for (w, _), t in zip(groups[1:], out[1:])}, slots

    def _meta(self, row_map: "RowMap", tables, once: bool = False):
        block_tables, window_tables, state_slots = tables
        return attention_metadata(row_map.positions, row_map.seq_ids, block_tables, self.block_size,
                                  self.num_blocks, valid=row_map.valid, sharding=self._sharding, once=once,
                                  window_tables=window_tables, state_slots=state_slots,
                                  num_state_slots=self.num_state_slots)

    def launch(self, plan: IterationPlan, after: Launched | None = None) -> Launched:
        """Dispatch a multi-step decode plan (plan.decode_steps steps in one program, Model.decode_steps)
        without waiting for it; `finish` collects it. after: the iteration this one runs ahead of
        (Scheduler.schedule_ahead), still running: each row's input token is its request's last token
        there, taken on the device, so the host never waits between the two."""
        t0 = time.perf_counter()
        self._release_and_import(plan)
        seq_of = {rid: i for i, rid in enumerate(plan.block_tables)}
        row_map = self._row_map(plan, plan.groups[0].slices, seq_of)
        R = len(row_map.valid)
        order = np.array([row_map.offsets[i] for i in range(len(plan.slices))])  # slice -> its row
        if after is None:
            token_ids = np.zeros(R, np.int32)
            token_ids[order] = [s.token_ids[0] for s in plan.slices]
            token_ids = to_device(token_ids, self._token_sharding)
        else:
            rows = np.zeros(R, np.int32)
            rows[order] = [after.rows[s.request_id] for s in plan.slices]
            token_ids = self._last_tokens(after.tokens, np.int32(after.plan.decode_steps - 1),
                                          to_device(rows, self._replicated))
        meta = self._meta(row_map, self._tables(plan, seq_of), once=True)
        stops = bucket(max(len(ids) for ids, _ in plan.decode_limits), minimum=1)
        stop_ids, remaining = np.full((R, stops), -1, np.int32), np.ones(R, np.int32)
        for row, (ids, left) in zip(order, plan.decode_limits):
            stop_ids[row, :len(ids)], remaining[row] = ids, left
        columns = [np.zeros(R, dtype) for dtype in (np.float32, np.int32, np.float32, np.uint32, np.int32)]
        for row, r in zip(order, plan.sampling):  # decode slices are all sampled, in slice order
            for column, value in zip(columns, (r.temperature, r.top_k, r.top_p, r.seed, r.output_index)):
                column[row] = value
        tokens, counts = self.model.decode_steps(
            token_ids, self.kv, meta, np.int32(plan.decode_steps), self.max_decode_steps,
            sample, to_device(tuple(columns), self._replicated), to_device(stop_ids, self._replicated),
            to_device(remaining, self._replicated))
        return Launched(plan, {s.request_id: int(row) for s, row in zip(plan.slices, order)}, tokens, counts, t0)

    def finish(self, launched: Launched) -> StepResult:
        """Wait for a launched multi-step decode -> its StepResult (`sampled_steps`: each request's
        tokens). Its elapsed time starts when it was dispatched or when the one before it finished,
        whichever is later."""
        host_tokens, (expert_tokens, distinct) = jax.device_get((launched.tokens, launched.counts))
        steps = {rid: [int(t) for t in host_tokens[:, row] if t >= 0] for rid, row in launched.rows.items()}
        result = self._result(launched.plan.as_steps({rid: len(t) for rid, t in steps.items()}),
                              {rid: t[0] for rid, t in steps.items()}, expert_tokens,
                              max(launched.t0, self._finished_at), distinct)
        self._finished_at = time.perf_counter()
        result.sampled_steps = steps
        return result

    def _run_whole_model(self, plan: IterationPlan, seq_of: dict[int, int], tables, head):
        """Every slice crosses every layer: one compiled program from tokens to sampled tokens."""
        row_map = self._row_map(plan, plan.groups[0].slices, seq_of)
        token_ids = np.zeros(len(row_map.valid), np.int32)
        for i, s in enumerate(plan.slices):
            token_ids[row_map.offsets[i]:row_map.offsets[i] + s.num_tokens] = s.token_ids
        meta = self._meta(row_map, tables, once=True)
        rows, columns = self._sampling_inputs(plan, row_map.offsets)
        return self.model.forward_all(to_device(token_ids, self._replicated), self.kv, meta, rows, head, *columns)

    def _run_groups(self, plan: IterationPlan, seq_of: dict[int, int], tables, head):
        """Group by group through the layers, hidden rows carried, embedded or kept between iterations."""
        L = self.config.num_layers
        counts = jnp.zeros((L, max(self.config.num_experts, 1)), jnp.int32)  # layers no slice crosses: zeros
        x, offsets = None, {}  # hidden rows of the previous group and where each slice sits in them
        for group in plan.groups:
            row_map = self._row_map(plan, group.slices, seq_of)
            x = self._group_rows(plan, group.slices, row_map, x, offsets)
            offsets = row_map.offsets
            meta = self._meta(row_map, tables)
            x, group_counts = self.run_layers(x, meta, group.layer_start, group.layer_end)
            counts = counts.at[group.layer_start:group.layer_end].set(jnp.stack(group_counts))
            for i in group.slices:  # slices stopping here before the last layer keep their rows
                s = plan.slices[i]
                if s.layer_end == group.layer_end < L:
                    self.stash.put(s.request_id, x, np.arange(offsets[i], offsets[i] + s.num_tokens))
        for s in plan.slices:  # a slice that reached the last layer needs no kept rows any more
            if s.layer_end == L:
                self.stash.release(s.request_id)
        rows, columns = self._sampling_inputs(plan, offsets)
        return head(self.model.logits(x, rows), *columns), counts

    def run_layers(self, x: jax.Array, meta, start: int, end: int) -> tuple[jax.Array, list[jax.Array]]:
        """Layers [start, end) on hidden rows x -> (x, tokens per expert per layer). The one place an
        executor that holds the routed experts elsewhere (offload, disaggregation) changes: it runs
        each layer in its steps (model.attend / route / experts / combine) and sets fuse=False."""
        return self.model.run_layers(x, self.kv, meta, start, end)

    def _row_map(self, plan: IterationPlan, members: tuple[int, ...], seq_of: dict[int, int]) -> RowMap:
        """Where each member slice's rows go: grouped by request shard, each shard padded to one bucket."""
        by_shard: list[list[int]] = [[] for _ in range(self.row_shards)]
        for i in members:
            by_shard[plan.kv_shards.get(plan.slices[i].request_id, 0)].append(i)
        width = bucket(max(sum(plan.slices[i].num_tokens for i in ids) for ids in by_shard))
        T = width * self.row_shards
        row_map = RowMap({}, np.zeros(T, np.int32), np.zeros(T, np.int32), np.zeros(T, bool))
        for shard, ids in enumerate(by_shard):
            row = shard * width
            for i in ids:
                s = plan.slices[i]
                row_map.offsets[i] = row
                span = slice(row, row + s.num_tokens)
                row_map.positions[span] = np.arange(s.start, s.start + s.num_tokens)
                row_map.seq_ids[span] = seq_of[s.request_id]
                row_map.valid[span] = True
                row += s.num_tokens
        return row_map

    def _group_rows(self, plan: IterationPlan, members: tuple[int, ...], row_map: RowMap, x_prev,
                    prev_offsets: dict[int, int]) -> jax.Array:
        """Hidden rows of a group in its row map: carried over from the previous group, embedded
        (slices starting at layer 0), or taken from the stash (slices resuming mid-model)."""
        new_tokens = [t for i in members if i not in prev_offsets and plan.slices[i].layer_start == 0
                      for t in plan.slices[i].token_ids]
        Tp = 0 if x_prev is None else x_prev.shape[0]
        Te = bucket(len(new_tokens)) if new_tokens else 0
        rows = np.zeros(len(row_map.valid), np.int32)  # padding rows copy row 0 (masked downstream)
        embedded, uses_stash = 0, False
        for i in members:
            s = plan.slices[i]
            at = slice(row_map.offsets[i], row_map.offsets[i] + s.num_tokens)
            if i in prev_offsets:
                rows[at] = np.arange(prev_offsets[i], prev_offsets[i] + s.num_tokens)
            elif s.layer_start == 0:
                rows[at] = Tp + embedded + np.arange(s.num_tokens)
                embedded += s.num_tokens
            else:
                rows[at] = Tp + Te + self.stash.rows(s.request_id)
                uses_stash = True
        return self.model.gather_rows(x_prev, pad_tokens(new_tokens, Te, self._replicated) if new_tokens else None,
                                      self.stash.pool if uses_stash else None, to_device(rows, self._replicated))

    def _sampling_inputs(self, plan: IterationPlan, offsets: dict[int, int]):
        """(rows of the last layer's output to sample from [R], the sampler's per-row columns)."""
        sampled_slices = [i for i, s in enumerate(plan.slices) if s.sample]
        R = bucket(len(plan.block_tables))  # the requests' bucket, like the block tables: one bucket less to compile
        rows = [offsets[i] + plan.slices[i].num_tokens - 1 for i in sampled_slices]
        pad = R - len(rows)
        s = plan.sampling
        columns = to_device(tuple(  # one transfer; padding rows have temperature 0 (argmax, dropped)
            np.pad(np.asarray(values, dtype), (0, pad)) for values, dtype in (
                ([r.temperature for r in s], np.float32), ([r.top_k for r in s], np.int32),
                ([r.top_p for r in s], np.float32), ([r.seed for r in s], np.uint32),
                ([r.output_index for r in s], np.int32))), self._replicated)
        return pad_tokens(rows, R, self._replicated), columns

    def _result(self, plan: IterationPlan, sampled: dict[int, int], expert_tokens: np.ndarray, t0: float,
                distinct: np.ndarray | None = None) -> StepResult:
        """distinct: experts each layer activated, summed over the steps of a multi-step plan (whose
        expert_tokens are summed over them too)."""
        cfg = self.config
        distinct = (expert_tokens > 0).sum(axis=1) if distinct is None else distinct
        return StepResult(sampled, time.perf_counter() - t0, routed_expert_bytes(cfg, distinct),
                          stats=lambda: layer_stats(cfg, plan, expert_tokens=expert_tokens, distinct_experts=distinct))


def _logprobs_of(plan: IterationPlan, chosen: np.ndarray, top_ids: np.ndarray, top_logprobs: np.ndarray) -> dict:
    """The sampler's log-probability outputs ([R], [R, K], [R, K] on the host) of the rows that asked."""
    return {row.request_id: TokenLogprobs(float(chosen[i]), tuple(top_ids[i].tolist()), tuple(top_logprobs[i].tolist()))
            for i, row in enumerate(plan.sampling) if row.logprobs}


# --- construction (moejax.engine.build(..., "jax")) ------------------------------------------------------

def default_kv_budget() -> int:
    """Bytes for the KV cache: 85% of what this process's first device has free (the least over all
    processes: they must size the same cache), or 512 MiB on CPU."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        free = int(0.85 * (stats["bytes_limit"] - stats.get("bytes_in_use", 0)))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            free = int(multihost_utils.process_allgather(np.int64(free)).min())
        return free
    return 512 << 20


def kv_blocks_for(model: Model, *, max_num_seqs: int, max_model_len: int, block_size: int,
                  num_blocks: int | None, kv_budget_bytes: int | None,
                  state_slots: int = 0) -> tuple[tuple[int, ...], int]:
    """(KV blocks of each KV group, request shards). The full-attention layers get `num_blocks`, else
    as many as fit `kv_budget_bytes` (default: free device memory) with the window groups' pools
    (kv_cache.group_blocks) and `state_slots` state slots but no more than max_num_seqs full requests;
    multiples of the request shards."""
    attention = model.placements.attention
    shards = attention.shards("batch") if attention else 1
    sizes = dict(max_num_seqs=max_num_seqs, max_model_len=max_model_len, num_shards=shards)
    if num_blocks is not None:
        return group_blocks(model.config, block_size, num_blocks, **sizes), shards
    budget = kv_budget_bytes if kv_budget_bytes is not None else default_kv_budget()
    return kv_pool_blocks(model.config, block_size, budget, max_full_blocks=max_num_seqs * math.ceil(
        max_model_len / block_size), state_slots=state_slots, **sizes), shards


def resolve_model(model, *, layout=None, dtype: str | None = None, seed: int = 0) -> Model:
    """A Model as given, or loaded from a preset / checkpoint name with `layout` and `dtype`."""
    if isinstance(model, Model):
        if layout is not None or dtype is not None:
            raise ValueError("layout and dtype apply when loading a model by name; this Model is loaded already "
                             "(give them to load_model)")
        return model
    from moejax.checkpoint import load_model

    return load_model(model, layout=layout, dtype=dtype, seed=seed)[0]


def create(model, *, max_num_seqs: int, max_model_len: int | None, block_size: int, seed: int = 0,
           layout=None, dtype: str | None = None, num_blocks: int | None = None,
           kv_budget_bytes: int | None = None, state_slots: int | None = None, fuse: bool = True,
           max_decode_steps: int = MAX_DECODE_STEPS):
    from moejax.engine.factory import Built

    model = resolve_model(model, layout=layout, dtype=dtype, seed=seed)
    max_model_len = max_model_len or min(model.config.max_position, 4096)
    state_slots = state_slots_for(model.config, max_num_seqs, state_slots)
    num_blocks, shards = kv_blocks_for(model, max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                                       block_size=block_size, num_blocks=num_blocks, kv_budget_bytes=kv_budget_bytes,
                                       state_slots=state_slots)
    executor = JaxExecutor(model, num_blocks, block_size, max_model_len, fuse=fuse, max_decode_steps=max_decode_steps,
                           state_slots=state_slots)
    return Built(executor, num_blocks, max_model_len, kv_shards=shards, state_slots=state_slots)
