"""The load scheduler: at each MoE layer, what to do with the experts it needs and may need next.

At layer l, once its routing is known, every needed expert is resident (or already on its way),
loaded now (on demand), or computed on the host; and experts of the next layers may be loaded ahead
(prefetched) into their layers' caches. One link carries all loads, on-demand first: a prefetch only
ever queues behind this layer's on-demand loads, never the other way round at a decision point.

    presched  (LayerScope's PreSched, arXiv 2509.23638) looks two layers ahead and shares the link:
              misses split between link and host to finish both soonest; prefetches fill only the
              time the link would otherwise idle -- while layer l computes on the device and the
              host -- first for l+1, then for l+2 with what is left of the window up to layer l+2
              after l+1's expected on-demand loads
    greedy    the layer-by-layer baseline: each miss on the host if that alone is faster, prefetch
              for l+1 every expert more likely needed than not, whatever the link is doing

Why the window: a prefetch of an expert needed with probability p that evicts one needed with
probability q saves (p - q) loads at its layer; the link time it takes is free only while the link
idles. Past that it delays the loads after it by a whole load, which (p - q) < 1 never repays. So a
prefetch must fit the window and be likelier needed than the expert it evicts (free slots first).
The same scheduler decides for the real executor (costs measured) and the simulator (costs from the
roofline and the host link): one rule, two executors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from moejax.offload.config import LOAD_RULES

MIN_PREFETCH_P = 0.1  # a guess less likely than this is not worth the link time and the energy


@dataclass(frozen=True)
class Costs:
    """What the scheduler weighs, in seconds."""

    load_s: float  # one expert host -> device
    window_s: np.ndarray  # [L] device time from layer l's experts to layer l+1's routing (link free for prefetch)
    host_s: Callable[[np.ndarray], np.ndarray] | None = None  # tokens [n] -> seconds per expert on the host


@dataclass
class Decision:
    load: np.ndarray  # misses loaded now, most tokens first
    host: np.ndarray  # misses computed on the host
    prefetch: dict[int, list[tuple[int, int]]]  # target layer -> [(expert, victim expert or -1 for a free slot)]


@dataclass(frozen=True)
class Target:
    """A layer loads may be chosen for: the experts worth loading and the slots a load may take."""

    layer: int
    prob: np.ndarray  # [E] P(the layer's rows need the expert), from the predictor
    candidates: np.ndarray  # experts not cached there, most probable first
    victims: np.ndarray  # slot holders in eviction order (-1: a free slot, first)


class LoadScheduler:
    def __init__(self, rule: str = "presched", host_compute: bool = False):
        if rule not in LOAD_RULES:
            raise ValueError(f"unknown load_rule {rule!r}; rules: {', '.join(LOAD_RULES)}")
        self.rule, self.host_compute = rule, host_compute

    def decide(self, layer: int, miss_tokens: np.ndarray, misses: np.ndarray, targets: list[Target],
               costs: Costs) -> Decision:
        """misses [n]: the experts layer `layer` needs and does not hold, with their tokens [n];
        targets: the next layers that have predictions, nearest first."""
        load, host = self._split_misses(miss_tokens, misses, costs)
        host_s = float(costs.host_s(miss_tokens[np.isin(misses, host)]).sum()) if len(host) else 0.0
        return Decision(load, host, self._prefetch(layer, targets, costs, host_s, len(load) * costs.load_s))

    def _split_misses(self, tokens: np.ndarray, misses: np.ndarray, costs: Costs) -> tuple[np.ndarray, np.ndarray]:
        order = np.argsort(-tokens, kind="stable")
        misses, tokens = misses[order], tokens[order]
        if not (self.host_compute and costs.host_s is not None and len(misses)):
            return misses, misses[:0]
        host_s = costs.host_s(tokens)
        if self.rule == "greedy":  # each expert on its own: the host when that alone is faster
            on_host = host_s < costs.load_s
            return misses[~on_host], misses[on_host]
        # Load the k busiest, the rest on the host, both at once: the k minimising the later finish.
        rest_host = np.concatenate([np.cumsum(host_s[::-1])[::-1], [0.0]])  # [n + 1]: host time of misses[k:]
        finish = np.maximum(np.arange(len(misses) + 1) * costs.load_s, rest_host)
        k = int(len(finish) - 1 - np.argmin(finish[::-1]))  # ties: the most loads (the device is the fast side)
        return misses[:k], misses[k:]

    def _prefetch(self, layer: int, targets: list[Target], costs: Costs, host_s: float, on_demand_s: float) -> dict:
        chosen: dict[int, list[tuple[int, int]]] = {}
        if self.rule == "greedy":
            for t in targets[:1]:
                chosen[t.layer] = _pair(t, lambda i, p, q: p >= 0.5 and p > q)
            return chosen
        load_s = costs.load_s
        # The link idles from the end of this layer's on-demand loads until the next routing: the device's
        # FFN and what follows it (the window), or the host's experts if they end later.
        budget = max(costs.window_s[layer], host_s - on_demand_s)
        used = 0.0
        for d, t in enumerate(targets):
            def take(i, p, q):
                return p > q and p >= MIN_PREFETCH_P and used + (i + 1) * load_s <= budget
            chosen[t.layer] = picked = _pair(t, take)
            used += len(picked) * load_s
            if d + 1 < len(targets):  # the next target's window: one more layer, less the expected loads of this one
                missed = np.setdiff1d(t.candidates, [e for e, _ in picked])
                budget += costs.window_s[t.layer] - float(t.prob[missed].sum()) * load_s
        return chosen


def _pair(t: Target, take: Callable[[int, float, float], bool]) -> list[tuple[int, int]]:
    """Walk candidates (most probable first) against victims (least probable first) while `take`
    (index, p of the candidate, q of the victim) says yes."""
    picked = []
    for i, (e, v) in enumerate(zip(t.candidates, t.victims)):
        q = 0.0 if v < 0 else float(t.prob[v])
        if not take(i, float(t.prob[e]), q):
            break
        picked.append((int(e), int(v)))
    return picked
