"""Expert replicas on the MoE instances of a disaggregated executor, and the per-step choice of the
replica that runs each activated expert (Janus, arXiv 2512.13525).

An MoE instance is one expert shard of the expert pool (`placements.experts.shards("expert")`; the
devices of a `replica` mesh axis hold one instance's copy each). Instance n holds `slots` expert
slots: MoE layer i's slot buffer is [N * slots, ...], split over `expert` so that instance n holds
slots [n * slots, (n + 1) * slots). Which experts an instance holds:

    replicas=None            the layout's split: instance n holds experts [n E/N, (n + 1) E/N), once each
    replicas="auto"          `place_replicas` from a routing load estimate (`expert_load` [E] or [L, E];
                             default uniform) with `expert_slots` slots per instance, per MoE layer
    replicas=[[e, ...], ...] per instance the experts it holds (every MoE layer alike)

Per MoE layer and step `run` is one program on the expert pool (nothing read on the host): it
counts the rows' tokens per expert, assigns every activated expert to one of its replicas by the
activation scheduler (`policy` "janus" or "token"), turns the assignment into the slot map
`slot_of` [E] the experts kernel reads (each row's expert runs on the chosen instance only), runs
the routed experts on the slot buffer, and returns their output split in row blocks over the pool
(what the exchange sends back), the tokens per expert and the distinct activated experts and tokens
per instance (the run's balance metrics).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from moejax.disagg.activation_scheduler import (POLICIES, assign_traced, instance_counts, place_replicas,
                                                 replica_table)
from moejax.models.model import Model
from moejax.models.moe import expert_counts


def instance_experts(replicas, num_experts: int, num_instances: int, slots: int | None,
                     load: np.ndarray | None, num_moe_layers: int) -> tuple[list[list[list[int]]], int]:
    """(per MoE layer, per instance the experts it holds; slots per instance) from the `replicas`
    option (module docstring). Raises naming the fault: an unknown expert, a list per instance that
    does not match the pool, more experts than an instance's slots, an expert no instance holds."""
    E, N = num_experts, num_instances
    if replicas is None:
        if E % N:
            raise ValueError(f"{E} experts do not split evenly over {N} MoE instances; give replicas=")
        held = [list(range(n * E // N, (n + 1) * E // N)) for n in range(N)]
        return [held] * num_moe_layers, E // N
    if isinstance(replicas, str):
        if replicas != "auto":
            raise ValueError(f"replicas={replicas!r}: expected 'auto', per-instance expert lists, or None")
        if slots is None:
            raise ValueError("replicas='auto' needs expert_slots= (expert slots per MoE instance)")
        load = np.ones(E) if load is None else np.asarray(load, float)
        if load.shape not in ((E,), (num_moe_layers, E)):
            raise ValueError(f"expert_load must be [E={E}] or [MoE layers={num_moe_layers}, E={E}], got {load.shape}")
        tables = place_replicas(np.broadcast_to(load, (num_moe_layers, E)), N, slots)  # [L, E, R]
        return [[np.flatnonzero((t == n).any(axis=1)).tolist() for n in range(N)] for t in tables], slots
    held = [[int(e) for e in experts] for experts in replicas]
    if len(held) != N:
        raise ValueError(f"replicas lists the experts of {len(held)} instances; the expert pool has {N} MoE "
                         "instances (its expert shards)")
    replica_table(held, E)  # unknown or doubled experts, experts held nowhere
    most = max(map(len, held))
    slots = most if slots is None else slots
    if most > slots:
        n = max(range(N), key=lambda k: len(held[k]))
        raise ValueError(f"replicas: instance {n} holds {most} experts, more than its expert_slots={slots}")
    return [held] * num_moe_layers, slots


def layout_own(held: list[list[int]], slots: int, num_experts: int) -> bool:
    """Whether one MoE layer's placement is the layout's own split: instance n holds slots
    [n * slots, (n + 1) * slots) filled with those experts in order, so the experts kernel reads the
    model's own buffer and nothing is copied."""
    return all(len(experts) == slots for experts in held) and sum(held, []) == list(range(num_experts))


def copied_slots(num_experts: int, num_instances: int, num_moe_layers: int, replicas=None,
                 expert_slots: int | None = None, expert_load: np.ndarray | None = None) -> int:
    """Expert slots per instance, summed over the MoE layers, that ExpertReplicas copies beside the
    model's own experts (0 for the layout's own split). Raises as instance_experts on a bad option."""
    held, slots = instance_experts(replicas, num_experts, num_instances, expert_slots, expert_load, num_moe_layers)
    return sum(slots for layer_held in held if not layout_own(layer_held, slots, num_experts))


@partial(jax.jit, static_argnames=("policy",))
def _schedule(ids, replicas, slot_in, policy):
    """ids [T, K] (E: padding), replicas [E, R], slot_in [N, E] (global slot of expert e on instance n,
    -1) -> (slot_of [E], tokens per expert [E], distinct experts [N] and tokens [N] per instance)."""
    N, E = slot_in.shape
    tokens = expert_counts(ids, E)
    assign = assign_traced(tokens, replicas, N, policy)
    slot_of = jnp.where(assign >= 0, slot_in[jnp.maximum(assign, 0), jnp.arange(E)], -1)
    return (slot_of, tokens, *instance_counts(assign, tokens, N))


class ExpertReplicas:
    """Per MoE layer of `model`: its slot buffer on the expert pool and its replica tables."""

    def __init__(self, model: Model, replicas=None, expert_slots: int | None = None,
                 expert_load: np.ndarray | None = None, policy: str = "janus"):
        if policy not in POLICIES:
            raise ValueError(f"activation_policy={policy!r}: expected one of {', '.join(POLICIES)}")
        if expert_slots is not None and (isinstance(expert_slots, bool) or not isinstance(expert_slots, int)
                                         or expert_slots < 1):
            raise ValueError(f"expert_slots={expert_slots!r}: must be an integer >= 1")
        cfg, placement = model.config, model.placements.experts
        self.policy, self.num_instances = policy, placement.shards("expert")
        blocks = jax.sharding.NamedSharding(placement.mesh, jax.sharding.PartitionSpec(placement.mesh.axis_names))
        self._run = jax.jit(partial(_expert_step, model.experts, policy, blocks))
        moe = [i for i, is_moe in enumerate(cfg.moe_layers) if is_moe]
        held, self.slots = instance_experts(replicas, cfg.num_experts, self.num_instances, expert_slots,
                                            expert_load, len(moe))
        on_pool = placement.sharding(())
        self.layers = {}  # MoE layer -> (buffer, replicas [E, R], slot_in [N, E]) on the expert pool
        for i, layer_held in zip(moe, held):
            expert_at = np.zeros((self.num_instances, self.slots), np.int32)  # empty slots: expert 0, never read
            slot_in = np.full((self.num_instances, cfg.num_experts), -1, np.int32)
            for n, experts in enumerate(layer_held):
                expert_at[n, :len(experts)] = experts
                slot_in[n, experts] = n * self.slots + np.arange(len(experts))
            buffer = model.expert_weights(i)
            if not layout_own(layer_held, self.slots, cfg.num_experts):
                buffer = _gather_slots(buffer, jax.device_put(expert_at.reshape(-1), on_pool),
                                       tuple(a.sharding for a in buffer))
            self.layers[i] = (buffer, jax.device_put(replica_table(layer_held, cfg.num_experts), on_pool),
                              jax.device_put(slot_in, on_pool))

    @property
    def replicated(self) -> bool:
        """Whether some expert has more than one replica (else every assignment is the same)."""
        return any(r.shape[1] > 1 for _, r, _ in self.layers.values())

    def schedule(self, i: int, ids: jax.Array):
        """MoE layer i's replica choice for rows routed to `ids` [T, K] -> (buffer, slot_of [E], tokens per
        expert [E], distinct experts [N], tokens [N] per instance)."""
        buffer, replicas, slot_in = self.layers[i]
        return (buffer, *_schedule(ids, replicas, slot_in, self.policy))

    def run(self, i: int, y: jax.Array, ids: jax.Array, weights: jax.Array):
        """MoE layer i's routed experts of rows y [T, D] (ids / weights [T, K]) on the expert pool, one
        program -> (out [T, D] in row blocks over the pool, tokens per expert [E], distinct experts [N],
        tokens [N] per instance)."""
        buffer, replicas, slot_in = self.layers[i]
        return self._run(y, ids, weights, buffer, replicas, slot_in)


def _expert_step(experts, policy, blocks, y, ids, weights, buffer, replicas, slot_in):
    slot_of, tokens, distinct, load = _schedule(ids, replicas, slot_in, policy)
    out = experts(y, ids, weights, buffer, slot_of)
    return jax.lax.with_sharding_constraint(out, blocks), tokens, distinct, load


@partial(jax.jit, static_argnums=2)
def _gather_slots(buffer: tuple, expert_at: jax.Array, shardings: tuple) -> tuple:
    """A slot buffer: slot s holds expert expert_at[s] of each array ([E, ...] -> [S, ...]), split like the
    layer's own experts."""
    return tuple(jax.lax.with_sharding_constraint(jnp.take(a, expert_at, axis=0), s)
                 for a, s in zip(buffer, shardings))
