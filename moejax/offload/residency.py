"""Which expert each device-cache slot holds, and the bookkeeping of every load: shared by the real
offload executor (which then copies the weights) and the simulator (which prices the copies).

Each MoE layer has a cache of N slots. A layer pass (the rows of one group crossing one MoE layer)
goes: the experts it needs that are cached, or on their way from an earlier prefetch, are hits; the
load scheduler splits the misses between the link and the host and chooses prefetches for the next
layers; misses take free slots, then the slots of experts this pass does not need, least worth
keeping first; misses beyond the slots are held for this pass only (transient). A prefetched expert
cannot be evicted before the pass it was loaded for.

Statistics per layer (OffloadStats): hit rate = hits / needed; prefetch precision = prefetched
experts the pass needed / prefetched; recall = those / needed experts not cached before the pass's
prefetches (what prefetching could have saved); exact host -> device bytes; stall seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from moejax.offload.schedule import Costs, LoadScheduler, Target


@dataclass
class LayerLoads:
    """What one layer pass moves (the executor carries it out)."""

    layer: int
    cached: list[tuple[int, int]]  # (expert, slot): loaded now into this layer's cache
    transient: list[int]  # loaded now for this pass only: the layer needs more experts than its slots
    host: list[int]  # computed on the host
    prefetch: list[tuple[int, int, int]]  # (target layer, expert, slot): loaded ahead

    @property
    def on_demand(self) -> list[int]:
        return [e for e, _ in self.cached] + self.transient


STAT_FIELDS = ("passes", "needed", "hits", "on_demand", "transient", "host", "prefetched", "prefetch_used",
               "missable", "bytes_h2d", "stall_s")
METRICS = ("offload_hit_rate", "offload_prefetch_precision", "offload_prefetch_recall", "offload_bytes_h2d",
           "offload_stall_s")


@dataclass
class OffloadStats:
    """Per-layer counters [L] of a run (see the module doc for the rates)."""

    num_layers: int
    counters: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self):
        for name in STAT_FIELDS:
            self.counters.setdefault(name, np.zeros(self.num_layers))

    def add(self, layer: int, **values: float) -> None:
        for name, v in values.items():
            self.counters[name][layer] += v

    def summary(self) -> dict:
        """Totals, rates (None where undefined: no prefetch, nothing needed) and per-layer lists."""
        c = {k: float(v.sum()) for k, v in self.counters.items()}

        def rate(a, b):
            return c[a] / c[b] if c[b] else None

        per_layer = {k: v.tolist() for k, v in self.counters.items()}
        with np.errstate(divide="ignore", invalid="ignore"):
            for name, (a, b) in {"hit_rate": ("hits", "needed"), "prefetch_precision": ("prefetch_used", "prefetched"),
                                 "prefetch_recall": ("prefetch_used", "missable")}.items():
                num, den = self.counters[a], self.counters[b]
                per_layer[name] = [float(x) if d else None for x, d in zip(num / np.where(den, den, 1), den)]
        return {"hit_rate": rate("hits", "needed"), "prefetch_precision": rate("prefetch_used", "prefetched"),
                "prefetch_recall": rate("prefetch_used", "missable"), "bytes_h2d": c["bytes_h2d"],
                "stall_s": c["stall_s"], "loads_on_demand": int(c["on_demand"]), "loads_transient": int(c["transient"]),
                "loads_prefetch": int(c["prefetched"]), "host_experts": int(c["host"]), "per_layer": per_layer}

    def metrics(self) -> dict:
        """The run-level metrics (moejax.engine.metrics names)."""
        s = self.summary()
        return {"offload_hit_rate": s["hit_rate"], "offload_prefetch_precision": s["prefetch_precision"],
                "offload_prefetch_recall": s["prefetch_recall"], "offload_bytes_h2d": s["bytes_h2d"],
                "offload_stall_s": s["stall_s"]}


class Residency:
    def __init__(self, moe_layers: tuple[bool, ...], num_experts: int, num_slots: int, expert_bytes: float,
                 scheduler: LoadScheduler):
        L, E, N = len(moe_layers), num_experts, num_slots
        self.moe_layers = np.flatnonzero(moe_layers)
        self.num_experts, self.num_slots, self.expert_bytes = E, N, expert_bytes
        self.scheduler = scheduler
        self.slot_of = np.full((L, E), -1, np.int32)  # [L, E] slot of each cached expert, -1: not cached
        self.held = np.full((L, N), -1, np.int32)  # [L, N] expert in each slot, -1: free
        self.last_used = np.zeros((L, E))  # [L, E] pass count when last needed (LRU order; 0: never)
        self.prefetched = [np.zeros(E, bool) for _ in range(L)]  # loaded ahead for the layer's next pass
        self.stats = OffloadStats(L)
        self._passes = 0

    def cached(self, layer: int) -> np.ndarray:
        """[E] bool: held in the layer's cache (or on its way there)."""
        return self.slot_of[layer] >= 0

    def layer_pass(self, layer: int, tokens: np.ndarray, predictions: dict[int, np.ndarray], costs: Costs,
                   keep: np.ndarray | None = None) -> LayerLoads:
        """Rows routed with `tokens` [E] per expert cross MoE layer `layer`. predictions: later layer ->
        [E] P(needed there); keep: [E] how much each cached expert is worth keeping (default: LRU)."""
        needed = tokens > 0
        cached, ahead = self.cached(layer), self.prefetched[layer]
        misses = np.flatnonzero(needed & ~cached)
        decision = self.scheduler.decide(layer, tokens[misses], misses, self._targets(layer, predictions), costs)
        placed, transient = self._place(layer, decision.load, needed, self.last_used[layer] if keep is None else keep)
        prefetch = self._prefetch(decision.prefetch)
        self._passes += 1
        self.last_used[layer, needed] = self._passes
        self.prefetched[layer] = np.zeros_like(ahead)
        self.stats.add(layer, passes=1, needed=needed.sum(), hits=(needed & cached).sum(), on_demand=len(decision.load),
                       transient=len(transient), host=len(decision.host), prefetch_used=(needed & ahead).sum(),
                       missable=(needed & ~(cached & ~ahead)).sum(), bytes_h2d=len(decision.load) * self.expert_bytes)
        return LayerLoads(layer, placed, transient, decision.host.tolist(), prefetch)

    def _targets(self, layer: int, predictions: dict[int, np.ndarray]) -> list[Target]:
        targets = []
        for m in sorted(m for m in predictions if m > layer):
            prob = np.asarray(predictions[m], np.float64)
            cached = self.cached(m)
            candidates = np.flatnonzero(~cached)
            candidates = candidates[np.argsort(-prob[candidates], kind="stable")]
            evictable = np.flatnonzero(cached & ~self.prefetched[m])
            evictable = evictable[np.lexsort((self.last_used[m, evictable], prob[evictable]))]
            free = np.full(int((self.held[m] < 0).sum()), -1)
            targets.append(Target(m, prob, candidates, np.concatenate([free, evictable])))
        return targets

    def _place(self, layer: int, load: np.ndarray, needed: np.ndarray, keep: np.ndarray):
        """Misses into free slots, then into slots of experts this pass does not need (least worth keeping
        first); the rest transient."""
        free = np.flatnonzero(self.held[layer] < 0)
        holders = self.held[layer][self.held[layer] >= 0]
        evictable = holders[~needed[holders]]
        evictable = evictable[np.argsort(keep[evictable], kind="stable")]
        slots = np.concatenate([free, self.slot_of[layer, evictable]]).astype(int)
        for v in evictable[:max(0, len(load) - len(free))]:
            self.slot_of[layer, v] = -1
        placed = list(zip(load[:len(slots)].tolist(), slots[:len(load)].tolist()))
        for e, s in placed:
            self.slot_of[layer, e], self.held[layer, s] = s, e
        return placed, load[len(slots):].tolist()

    def _prefetch(self, chosen: dict[int, list[tuple[int, int]]]) -> list[tuple[int, int, int]]:
        out = []
        for m, pairs in chosen.items():
            free = list(np.flatnonzero(self.held[m] < 0))
            for e, v in pairs:
                if v < 0:
                    s = int(free.pop(0))
                else:
                    s = int(self.slot_of[m, v])
                    self.slot_of[m, v] = -1
                self.slot_of[m, e], self.held[m, s] = s, e
                self.prefetched[m][e] = True
                out.append((m, e, s))
            self.stats.add(m, prefetched=len(pairs), bytes_h2d=len(pairs) * self.expert_bytes)
        return out
