"""Runs IterationPlans with the real model on one device mesh.

A host loop over the plan's layer groups: for each group, gather its rows' hidden states (carried
from the previous group, freshly embedded, or kept from an earlier iteration), build the attention
metadata, run the group's layers. Row counts are padded to power-of-two buckets, so steady state
compiles nothing. Everything is dispatched asynchronously; the only host sync is reading the sampled
tokens and the per-layer expert counts at the end.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from moejax.engine.metadata import attention_metadata, bucket, pad_tokens, to_device
from moejax.engine.plan import IterationPlan, StepResult
from moejax.engine.sampling import sample
from moejax.engine.traffic import layer_stats
from moejax.models.model import Model


@jax.jit
def _scatter_rows(pool: jax.Array, x: jax.Array, src: jax.Array, dst: jax.Array) -> jax.Array:
    return pool.at[dst].set(jnp.take(x, src, axis=0), mode="drop")


class HiddenStash:
    """Hidden rows of slices that stopped before the last layer, kept on device between iterations
    (layered prefill keeps a whole prompt here while it crosses the layer groups). One pool [P, D]
    with rows handed out per request, so gathering from it never changes shapes. `sharding` places the
    pool and the row indices (None: uncommitted)."""

    def __init__(self, hidden_size: int, dtype, sharding=None, rows: int = 0):
        """rows: pool size to start with (the most rows the policy keeps at once); a pool that must
        grow changes the shape of the functions reading it, which then compile again."""
        self.sharding = sharding
        self.pool = jnp.zeros((0, hidden_size), dtype, device=sharding)
        self._rows: dict[int, np.ndarray] = {}
        self._free: list[int] = []
        if rows:
            self._grow(rows)

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
class RowLayout:
    offsets: dict[int, int]  # slice index -> its first row
    positions: np.ndarray  # [T]
    seq_ids: np.ndarray  # [T]
    valid: np.ndarray  # [T]


class JaxExecutor:
    """Runs plans on the model's placement. Under data parallelism the rows of each group are laid out
    shard-major (each request shard's rows together, every shard padded to the same bucket), so each
    shard attends over the KV blocks it owns."""

    def __init__(self, model: Model, num_blocks: int, block_size: int, max_model_len: int, kept_rows: int = 0,
                 fuse: bool = True):
        """kept_rows: hidden rows the policy may keep between iterations at once (sizes the stash).
        fuse: run iterations whose slices all cross every layer as one compiled program (else layer by
        layer, as every other iteration runs)."""
        self.fuse = fuse
        self.model = model
        self.config = model.config
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.row_shards = model.placement.shards("batch") if model.placement else 1
        self.blocks_per_shard = num_blocks // self.row_shards
        self.max_blocks_per_seq = math.ceil(max_model_len / block_size)
        self.kv = model.init_kv_cache(num_blocks, block_size)
        placement = model.placement
        self._sharding = placement.sharding if placement else None
        # Inputs with no layout axis (token ids, row indices, sampling columns) are replicated. In one
        # process they stay uncommitted and jit places them; on a mesh over several processes (one per
        # host) jit takes global arrays only.
        self._replicated = placement.sharding(()) if placement and placement.mesh.is_multi_process else None
        self.stash = HiddenStash(model.config.hidden_size, model.dtype, self._replicated, kept_rows)

    def execute(self, plan: IterationPlan) -> StepResult:
        t0 = time.perf_counter()
        for rid in plan.released:
            self.stash.release(rid)
        L, E = self.config.num_layers, max(self.config.num_experts, 1)
        if not plan.slices:
            return self._result(plan, {}, np.zeros((L, E), np.int64), t0)

        seq_of = {rid: i for i, rid in enumerate(plan.block_tables)}
        tables = np.zeros((len(seq_of), self.max_blocks_per_seq), np.int32)
        for rid, i in seq_of.items():
            blocks = plan.block_tables[rid]
            tables[i, :len(blocks)] = blocks

        whole = plan.groups[0]
        if self.fuse and len(plan.groups) == 1 and (whole.layer_start, whole.layer_end) == (0, L):
            tokens, counts = self._run_whole_model(plan, seq_of, tables)
        else:
            tokens, counts = self._run_groups(plan, seq_of, tables)
        host_tokens, host_counts = jax.device_get((tokens, counts))
        expert_tokens = np.zeros((L, E), np.int64)
        for layer, c in enumerate(host_counts):
            if c is not None:
                expert_tokens[layer, :len(c)] = c
        sampled = {row.request_id: int(t) for row, t in zip(plan.sampling, host_tokens)}
        return self._result(plan, sampled, expert_tokens, t0)

    def _run_whole_model(self, plan: IterationPlan, seq_of: dict[int, int], tables: np.ndarray):
        """Every slice crosses every layer: one compiled program from tokens to sampled tokens."""
        layout = self._layout(plan, plan.groups[0].slices, seq_of)
        token_ids = np.zeros(len(layout.valid), np.int32)
        for i, s in enumerate(plan.slices):
            token_ids[layout.offsets[i]:layout.offsets[i] + s.num_tokens] = s.token_ids
        meta = attention_metadata(layout.positions, layout.seq_ids, tables, self.block_size, self.num_blocks,
                                  valid=layout.valid, sharding=self._sharding, once=True)
        rows, columns = self._sampling_inputs(plan, layout.offsets)
        return self.model.forward_all(to_device(token_ids, self._replicated), self.kv, meta, rows, sample, *columns)

    def _run_groups(self, plan: IterationPlan, seq_of: dict[int, int], tables: np.ndarray):
        """Group by group through the layers, hidden rows carried, embedded or kept between iterations."""
        L = self.config.num_layers
        counts: list[jax.Array | None] = [None] * L
        x, offsets = None, {}  # hidden rows of the previous group and where each slice sits in them
        for group in plan.groups:
            layout = self._layout(plan, group.slices, seq_of)
            x = self._group_rows(plan, group.slices, layout, x, offsets)
            offsets = layout.offsets
            meta = attention_metadata(layout.positions, layout.seq_ids, tables, self.block_size, self.num_blocks,
                                      valid=layout.valid, sharding=self._sharding)
            x, group_counts = self.model.run_layers(x, self.kv, meta, group.layer_start, group.layer_end)
            counts[group.layer_start:group.layer_end] = group_counts
            for i in group.slices:  # slices stopping here before the last layer keep their rows
                s = plan.slices[i]
                if s.layer_end == group.layer_end < L:
                    self.stash.put(s.request_id, x, np.arange(offsets[i], offsets[i] + s.num_tokens))
        for s in plan.slices:  # a slice that reached the last layer needs no kept rows any more
            if s.layer_end == L:
                self.stash.release(s.request_id)
        rows, columns = self._sampling_inputs(plan, offsets)
        return sample(self.model.logits(x, rows), *columns), counts

    def _layout(self, plan: IterationPlan, members: tuple[int, ...], seq_of: dict[int, int]) -> "RowLayout":
        """Where each member slice's rows go: grouped by request shard, each shard padded to one bucket."""
        by_shard: list[list[int]] = [[] for _ in range(self.row_shards)]
        for i in members:
            rid = plan.slices[i].request_id
            by_shard[plan.block_tables[rid][0] // self.blocks_per_shard].append(i)
        width = bucket(max(sum(plan.slices[i].num_tokens for i in ids) for ids in by_shard))
        T = width * self.row_shards
        layout = RowLayout({}, np.zeros(T, np.int32), np.zeros(T, np.int32), np.zeros(T, bool))
        for shard, ids in enumerate(by_shard):
            row = shard * width
            for i in ids:
                s = plan.slices[i]
                layout.offsets[i] = row
                span = slice(row, row + s.num_tokens)
                layout.positions[span] = np.arange(s.start, s.start + s.num_tokens)
                layout.seq_ids[span] = seq_of[s.request_id]
                layout.valid[span] = True
                row += s.num_tokens
        return layout

    def _group_rows(self, plan: IterationPlan, members: tuple[int, ...], layout: "RowLayout", x_prev,
                    prev_offsets: dict[int, int]) -> jax.Array:
        """Hidden rows of a group in its layout: carried over from the previous group, embedded
        (slices starting at layer 0), or taken from the stash (slices resuming mid-model)."""
        new_tokens = [t for i in members if i not in prev_offsets and plan.slices[i].layer_start == 0
                      for t in plan.slices[i].token_ids]
        Tp = 0 if x_prev is None else x_prev.shape[0]
        Te = bucket(len(new_tokens)) if new_tokens else 0
        rows = np.zeros(len(layout.valid), np.int32)  # padding rows copy row 0 (masked downstream)
        embedded, uses_stash = 0, False
        for i in members:
            s = plan.slices[i]
            at = slice(layout.offsets[i], layout.offsets[i] + s.num_tokens)
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
        R = bucket(len(sampled_slices))
        rows = [offsets[i] + plan.slices[i].num_tokens - 1 for i in sampled_slices]
        pad = R - len(rows)
        s = plan.sampling
        columns = to_device(tuple(  # one transfer; padding rows have temperature 0 (argmax, dropped)
            np.pad(np.asarray(values, dtype), (0, pad)) for values, dtype in (
                ([r.temperature for r in s], np.float32), ([r.top_k for r in s], np.int32),
                ([r.top_p for r in s], np.float32), ([r.seed for r in s], np.uint32),
                ([r.output_index for r in s], np.int32))), self._replicated)
        return pad_tokens(rows, R, self._replicated), columns

    def _result(self, plan: IterationPlan, sampled: dict[int, int], expert_tokens: np.ndarray, t0: float) -> StepResult:
        stats = layer_stats(self.config, plan, expert_tokens=expert_tokens)
        return StepResult(sampled=sampled, elapsed_s=time.perf_counter() - t0, layer_stats=stats)
