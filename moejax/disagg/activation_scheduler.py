"""Which replica of each activated expert runs it: Janus's activation scheduler (arXiv 2512.13525).

Experts may have replicas on several MoE instances. A decode step's MoE time on an instance is
memory-bound, so it follows the number of *distinct* experts the instance must read, and the layer
waits for the busiest instance. Per layer and step the scheduler assigns every activated expert
(all of its tokens) to one of its replicas so that the maximum number of distinct activated experts
on any instance is minimal, with the token load as the tie-break.

Method (exact for the distinct-expert maximum; `assign_activations(..., policy="janus")`):
  1. greedy: experts with the fewest replicas first (then the most tokens), each to the replica
     instance holding the fewest distinct experts so far, ties to the fewest tokens;
  2. augmenting paths: while an instance at the maximum count C reaches, through a chain of
     "expert on instance a also has a replica on b" moves, an instance holding <= C - 2, shift the
     experts along that path (the source loses one, the target gains one). When no such path exists
     the maximum is optimal: the instances reachable from the maximal ones hold >= C - 1 each, and the
     experts on them have replicas only among them, so any assignment puts >= C on one of them
     (Harvey et al.'s cost-reducing paths for semi-matchings, applied to the maximum);
  3. token tie-break: while moving one expert off the most-loaded instance (in tokens) to a replica
     instance below C distinct experts lowers that instance pair's maximum, move it.

Baseline (`policy="token"`, EPLB-like token balancing): experts by descending tokens (LPT), each to
the replica instance with the fewest tokens so far, whatever it does to the distinct count.

Shapes: tokens [E] (or [L, E]) tokens per expert this step (0: not activated); replicas [E, R] (or
[L, E, R]) instance ids of each expert's replicas, -1 padding. The result is [E] (or [L, E]): the
chosen instance of every activated expert, -1 for experts no token activated.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

POLICIES = ("janus", "token")


# --- replica tables ----------------------------------------------------------------------------------

def replica_table(instance_experts: Sequence[Sequence[int]], num_experts: int) -> np.ndarray:
    """[E, R] replica table (instance ids, -1 padding) from the experts each instance holds:
    `instance_experts[i]` lists instance i's expert ids. Raises on an unknown expert id, an expert
    held twice by one instance, or an expert no instance holds."""
    holders: list[list[int]] = [[] for _ in range(num_experts)]
    for i, experts in enumerate(instance_experts):
        for e in experts:
            e = int(e)
            if not 0 <= e < num_experts:
                raise ValueError(f"instance {i} holds a replica of expert {e}, but the model has experts "
                                 f"0..{num_experts - 1}")
            if i in holders[e]:
                raise ValueError(f"instance {i} lists expert {e} twice")
            holders[e].append(i)
    missing = [e for e, h in enumerate(holders) if not h]
    if missing:
        raise ValueError(f"experts {missing[:8]}{' ...' if len(missing) > 8 else ''} have no replica on any "
                         f"of the {len(instance_experts)} instances")
    table = np.full((num_experts, max(map(len, holders))), -1, np.int32)
    for e, h in enumerate(holders):
        table[e, :len(h)] = h
    return table


def check_replicas(replicas: np.ndarray, num_experts: int, num_instances: int) -> None:
    """A replica table [E, R] (or [L, E, R]) fits the model and the instances; raises naming the fault."""
    replicas = np.asarray(replicas)
    if replicas.ndim not in (2, 3) or replicas.shape[-2] != num_experts:
        raise ValueError(f"replicas must be [E={num_experts}, R] or [L, E={num_experts}, R], got shape "
                         f"{replicas.shape}")
    bad = (replicas < -1) | (replicas >= num_instances)
    if bad.any():
        raise ValueError(f"replicas names instance {int(replicas[bad][0])}; instances are 0..{num_instances - 1} "
                         "(-1 pads)")
    none = ~(replicas >= 0).any(axis=-1)
    if none.any():
        raise ValueError(f"expert {int(np.argwhere(none)[0][-1])} has no replica (its row is all -1)")


def place_replicas(load: np.ndarray, num_instances: int, slots_per_instance: int) -> np.ndarray:
    """EPLB-style replica placement from routing statistics: every expert once, the instances' spare
    slots to the experts with the highest load per replica (at most one replica per instance), then
    replicas by descending load per replica onto the instance with the least load that has a free
    slot and no copy yet. load [E] (or [L, E], placed per layer): activation frequency or mean tokens.
    Returns replicas [E, R] (or [L, E, R]), -1 padding."""
    load = np.asarray(load, float)
    if load.ndim == 2:
        tables = [place_replicas(row, num_instances, slots_per_instance) for row in load]
        R = max(t.shape[1] for t in tables)
        return np.stack([np.pad(t, ((0, 0), (0, R - t.shape[1])), constant_values=-1) for t in tables])
    E = len(load)
    if num_instances * slots_per_instance < E:
        raise ValueError(f"{num_instances} instances x {slots_per_instance} expert slots hold "
                         f"{num_instances * slots_per_instance} experts, fewer than the model's {E}")
    copies = np.ones(E, int)
    for _ in range(min(num_instances * slots_per_instance, E * num_instances) - E):
        per_copy = np.where(copies < num_instances, load / copies, -np.inf)
        copies[np.argmax(per_copy)] += 1
    units = sorted(((load[e] / copies[e], e) for e in range(E) for _ in range(copies[e])), reverse=True)
    held = [set() for _ in range(num_instances)]
    inst_load = np.zeros(num_instances)
    for share, e in units:
        free = [i for i in range(num_instances) if len(held[i]) < slots_per_instance and e not in held[i]]
        if not free:  # every free slot is on an instance that has this expert already: drop the copy
            continue
        i = min(free, key=lambda j: (inst_load[j], len(held[j])))
        held[i].add(e)
        inst_load[i] += share
    return replica_table([sorted(h) for h in held], E)


# --- the scheduler (jitted) -------------------------------------------------------------------------

def instance_counts(assign, tokens, num_instances):
    """Distinct experts [N] and tokens [N] per instance of an assignment [E] (-1: unassigned); traceable."""
    idx = jnp.where(assign >= 0, assign, num_instances)
    distinct = jnp.zeros(num_instances, jnp.int32).at[idx].add(1, mode="drop")
    load = jnp.zeros(num_instances, tokens.dtype).at[idx].add(tokens, mode="drop")
    return distinct, load


def _greedy(tokens, replicas, num_instances, distinct_first: bool):
    """One pass over the active experts; janus: fewest replicas first, to the fewest distinct experts
    (ties: fewest tokens); token: most tokens first, to the fewest tokens."""
    E = tokens.shape[0]
    active = tokens > 0
    n_rep = (replicas >= 0).sum(axis=1)
    big = jnp.iinfo(jnp.int32).max
    if distinct_first:
        order = jnp.lexsort((-tokens, n_rep, ~active))  # last key is the primary one
    else:
        order = jnp.lexsort((-tokens, ~active))
    valid_rep = replicas >= 0
    safe_rep = jnp.where(valid_rep, replicas, 0)

    def place(i, state):
        assign, distinct, load = state
        e = order[i]
        cand, ok = safe_rep[e], valid_rep[e]
        d, t = jnp.where(ok, distinct[cand], big), jnp.where(ok, load[cand], big)
        first, second = (d, t) if distinct_first else (t, d)
        best_first = first.min()
        pick = cand[jnp.argmin(jnp.where(first == best_first, second, big))]
        pick = jnp.where(active[e], pick, -1)
        inst = jnp.where(pick >= 0, pick, num_instances)
        return (assign.at[e].set(pick), distinct.at[inst].add(1, mode="drop"),
                load.at[inst].add(tokens[e], mode="drop"))

    init = (jnp.full(E, -1, jnp.int32), jnp.zeros(num_instances, jnp.int32), jnp.zeros(num_instances, tokens.dtype))
    return jax.lax.fori_loop(0, E, place, init)[0]


def _reduce_max_distinct(assign, tokens, replicas, num_instances):
    """Augmenting paths from the instances at the maximal distinct count to one holding <= max - 2."""
    E, R = replicas.shape
    N = num_instances
    expert = jnp.broadcast_to(jnp.arange(E, dtype=jnp.int32)[:, None], (E, R))

    def find_path(assign):
        distinct, _ = instance_counts(assign, tokens, N)
        top = distinct.max()
        # witness[a, b]: an expert on instance a with a replica on b (-1: none)
        edge = (assign[:, None] >= 0) & (replicas >= 0) & (replicas != assign[:, None])
        src = jnp.where(edge, assign[:, None], N)
        witness = jnp.full((N, N), -1, jnp.int32).at[src, jnp.where(edge, replicas, 0)].max(expert, mode="drop")
        adj = witness >= 0

        def bfs(_, state):
            reached, frontier, pred = state
            step = frontier[:, None] & adj & ~reached[None, :]  # [a, b]
            new = step.any(axis=0)
            pred = jnp.where(new, jnp.argmax(step, axis=0).astype(jnp.int32), pred)
            return reached | new, new, pred

        sources = distinct == top
        reached, _, pred = jax.lax.fori_loop(0, N, bfs, (sources, sources, jnp.full(N, -1, jnp.int32)))
        target_ok = reached & (distinct <= top - 2)
        target = jnp.argmin(jnp.where(target_ok, distinct, E + 1)).astype(jnp.int32)
        return target_ok.any(), target, pred, witness

    def cond(state):
        return state[1]

    def body(state):
        assign, _, iters = state
        found, target, pred, witness = find_path(assign)

        def walk(_, s):  # shift one expert along each edge of the path, target back to its source
            assign, b = s
            a = pred[b]
            move = found & (a >= 0)
            e = witness[jnp.maximum(a, 0), b]
            assign = jnp.where(move, assign.at[jnp.maximum(e, 0)].set(b), assign)
            return assign, jnp.where(move, a, b)

        assign, _ = jax.lax.fori_loop(0, N, walk, (assign, target))
        return assign, found & (iters < E * N), iters + 1

    return jax.lax.while_loop(cond, body, (assign, True, 0))[0]


def _balance_tokens(assign, tokens, replicas, num_instances):
    """Single-expert moves off the most-loaded instance that keep every instance at or below the
    maximal distinct count and lower the pair's token maximum."""
    E, _ = replicas.shape
    top = instance_counts(assign, tokens, num_instances)[0].max()
    inf = jnp.iinfo(tokens.dtype).max

    def best_move(assign):
        distinct, load = instance_counts(assign, tokens, num_instances)
        a = jnp.argmax(load)
        ok = (assign[:, None] == a) & (replicas >= 0) & (replicas != a)
        ok &= distinct[jnp.where(replicas >= 0, replicas, 0)] < top
        t = tokens[:, None]
        after = jnp.maximum(load[a] - t, load[jnp.where(replicas >= 0, replicas, 0)] + t)
        after = jnp.where(ok, after, inf)
        flat = jnp.argmin(after)
        return after.reshape(-1)[flat] < load[a], flat // replicas.shape[1], replicas.reshape(-1)[flat]

    def body(state):
        assign, _, iters = state
        better, e, b = best_move(assign)
        return jnp.where(better, assign.at[e].set(b), assign), better & (iters < E), iters + 1

    return jax.lax.while_loop(lambda s: s[1], body, (assign, True, 0))[0]


def assign_traced(tokens, replicas, num_instances: int, policy: str) -> jax.Array:
    """One layer's assignment [E] (tokens [E], replicas [E, R]): traceable, for a caller's own jit."""
    if policy == "token":
        return _greedy(tokens, replicas, num_instances, distinct_first=False)
    assign = _greedy(tokens, replicas, num_instances, distinct_first=True)
    assign = _reduce_max_distinct(assign, tokens, replicas, num_instances)
    return _balance_tokens(assign, tokens, replicas, num_instances)


@partial(jax.jit, static_argnames=("num_instances", "policy"))
def _assign(tokens, replicas, num_instances, policy):
    if tokens.ndim == 2:  # [L, E]: every layer at once
        return jax.vmap(lambda t, r: assign_traced(t, r, num_instances, policy))(tokens, replicas)
    return assign_traced(tokens, replicas, num_instances, policy)


def assign_activations(tokens, replicas, num_instances: int, policy: str = "janus") -> jax.Array:
    """The chosen instance [E] (or [L, E]) of every activated expert, -1 where no token activated it
    (module docstring). tokens [E] / [L, E] int; replicas [E, R] / [L, E, R] int, -1 padding (replicas
    [E, R] with tokens [L, E] is used for every layer). Instance and replica counts are padded (powers of
    two, at least 8 and 4) so that searches over deployments share compiled programs."""
    if policy not in POLICIES:
        raise ValueError(f"unknown activation policy {policy!r}; policies: {', '.join(POLICIES)}")
    tokens = jnp.asarray(tokens, jnp.int32)
    replicas = np.asarray(replicas)
    check_replicas(replicas, tokens.shape[-1], num_instances)
    if tokens.ndim == 2 and replicas.ndim == 2:
        replicas = np.broadcast_to(replicas, (tokens.shape[0], *replicas.shape))
    if replicas.ndim != tokens.ndim + 1:
        raise ValueError(f"tokens {tokens.shape} and replicas {replicas.shape} disagree on the layer dimension")
    num_instances = int(num_instances)
    pad_r = _padded(replicas.shape[-1], 4) - replicas.shape[-1]
    replicas = np.pad(replicas, [(0, 0)] * (replicas.ndim - 1) + [(0, pad_r)], constant_values=-1)
    return _assign(tokens, jnp.asarray(replicas, jnp.int32), _padded(num_instances, 8), policy)


def _padded(n: int, least: int) -> int:
    """The next power of two >= max(n, least): one compiled program serves many sizes."""
    return 1 << max(max(n, least) - 1, 0).bit_length()


def instance_load(assign: np.ndarray, tokens: np.ndarray, num_instances: int) -> tuple[np.ndarray, np.ndarray]:
    """(distinct experts, tokens) per instance, [..., N] each, of an assignment [..., E]."""
    assign, tokens = np.asarray(assign), np.asarray(tokens)
    onehot = assign[..., None] == np.arange(num_instances)  # [..., E, N]
    return onehot.sum(axis=-2), (onehot * tokens[..., None]).sum(axis=-2)
