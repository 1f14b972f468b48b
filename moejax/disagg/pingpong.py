"""The layer loop of an executor whose routed experts run elsewhere, with micro-batch ping-pong
(MegaScale-Infer, arXiv 2504.02263): a layer group's rows split by request into m micro-batches,
dispatched so that micro-batch j's experts run while micro-batch j+1 attends. Per micro-batch and
MoE layer:

    combine of the previous layer (its experts' output received), attend, route    here, one program
    send_experts(i, y, ids, weights)                                               -> where the experts are
    ... the next micro-batch attends meanwhile ...
    expert_output(handle)                                                          <- their output

Subclasses say where the experts are: DisaggExecutor (moejax.disagg.executor, another device pool
of this process), RemoteExpertsExecutor (moejax.disagg.remote, another process). The step's m is
`self.step_micro_batches`, set per plan by the subclass.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from moejax.disagg.microbatch import split_rows
from moejax.disagg.timeline import Timeline
from moejax.engine.jax_executor import JaxExecutor, RowMap, _scatter_rows
from moejax.engine.metadata import to_device


@jax.jit
def _take_rows(x: jax.Array, rows: jax.Array) -> jax.Array:
    return jnp.take(x, rows, axis=0)


class PingPongExecutor(JaxExecutor):
    """A JaxExecutor (fuse=False: every layer in its steps) whose run_layers hands each MoE layer's
    routed rows to `send_experts` and combines what `expert_output` gives back with the next layer's
    attend and route (Model.attention_stage), m micro-batches in flight. Attention pieces are recorded
    in `self.timeline` (pool "attention")."""

    def __init__(self, model, num_blocks, block_size: int, max_model_len: int, *, state_slots: int = 0):
        super().__init__(model, num_blocks, block_size, max_model_len, fuse=False, state_slots=state_slots)
        self.timeline = Timeline()
        self.last_pools = None  # the last step's busy intervals (benchmarks plot them)
        self.step_micro_batches = 1
        self._group: tuple[RowMap, tuple] | None = None

    def finish_pools(self) -> dict:
        """The step's pool metrics for its result's `extra` (waits for every recorded piece)."""
        pools = self.last_pools = self.timeline.finish()
        return dict(micro_batches=self.step_micro_batches, attention_busy_s=pools.attention_s,
                    expert_busy_s=pools.experts_s, exchange_busy_s=pools.exchange_s,
                    pool_overlap_s=pools.overlap_s, pools_wall_s=pools.wall_s, **pools.fractions())

    def send_experts(self, i: int, y: jax.Array, ids: jax.Array, weights: jax.Array, routed_at: int):
        """Start MoE layer i's routed experts on rows y [T, D] (ids / weights [T, K]; routed_at: the
        timeline index of the attention piece that made them) without waiting -> (handle for
        expert_output, tokens per expert [E])."""
        raise NotImplementedError

    def expert_output(self, handle) -> tuple[jax.Array, tuple[int, ...]]:
        """-> (the routed experts' output [T, D] on the attention side, timeline indices it follows)."""
        raise NotImplementedError

    def _meta(self, row_map: RowMap, tables, once: bool = False):
        self._group = (row_map, tables)  # run_layers splits this group's rows into micro-batches
        return super()._meta(row_map, tables, once)

    def run_layers(self, x: jax.Array, meta, start: int, end: int) -> tuple[jax.Array, list]:
        model, E = self.model, max(self.config.num_experts, 1)
        row_map, tables = self._group
        batches = [(x, meta, None)] if self.step_micro_batches == 1 else [
            (_take_rows(x, to_device(np.maximum(rows, 0), self._replicated)), super(PingPongExecutor, self)._meta(
                RowMap({}, row_map.positions[rows], row_map.seq_ids[rows], row_map.valid[rows] & (rows >= 0)),
                tables), rows)
            for rows in split_rows(row_map.valid, row_map.seq_ids, self.row_shards, self.step_micro_batches)]
        xs = [b[0] for b in batches]
        pending: list = [None] * len(batches)  # (h, y, expert handle or None, timeline index) of the last layer
        counts = []
        for i in range(start, end):
            layer_counts = None  # tokens per expert [E]
            for j, (_, mb_meta, _) in enumerate(batches):
                prev, after = self._received(pending[j])
                h, self.kv[i], y, weights, ids = model.attention_stage(i, xs[j], self.kv[i], mb_meta, prev)
                routed_at = self.timeline.add("attention", (h, y), after)
                handle = None
                if ids is not None:
                    handle, tokens = self.send_experts(i, y, ids, weights, routed_at)
                    layer_counts = tokens if layer_counts is None else layer_counts + tokens
                pending[j] = (h, y, handle, routed_at)
            counts.append(jnp.zeros((E,), jnp.int32) if layer_counts is None else layer_counts)
        for j, p in enumerate(pending):  # the last layer's combine
            prev, after = self._received(p)
            xs[j] = model.combine(end - 1, *prev)
            self.timeline.add("attention", xs[j], after)
        if self.step_micro_batches == 1:
            return xs[0], counts
        T = x.shape[0]
        for x_j, (_, _, rows) in zip(xs, batches):  # each micro-batch's rows back in the group's row map
            src = to_device(np.arange(len(rows), dtype=np.int32), self._replicated)
            x = _scatter_rows(x, x_j, src, to_device(np.where(rows >= 0, rows, T).astype(np.int32), self._replicated))
        return x, counts

    def _received(self, pending) -> tuple[tuple | None, tuple[int, ...]]:
        """A micro-batch's last layer as the next stage takes it: ((h, y, routed) or None, the timeline
        indices its combine follows)."""
        if pending is None:
            return None, ()
        h, y, handle, routed_at = pending
        routed, after = (None, (routed_at,)) if handle is None else self.expert_output(handle)
        return (h, y, routed), after
