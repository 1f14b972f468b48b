"""Pricing a plan before it runs: the cost model with the routing model's *expected* activated
experts instead of a random draw — what a scheduler deciding ahead can know (the adaptive layered
policy asks it how many layers a prompt cohort can cross within a TBT target)."""

from __future__ import annotations

import numpy as np

from moejax.config import ModelConfig
from moejax.engine import traffic
from moejax.engine.plan import IterationPlan
from moejax.sim.cost_model import Calibration, CostModel
from moejax.sim.hardware import Hardware
from moejax.sim.routing import PlackettLuceRouting, RoutingModel


class ExpectedPricer:
    """price(plan) -> modelled seconds. A slice of n tokens leaves expert e of layer l unused with
    probability q_n[l, e] = mean over routing classes of (1 - π[l, c, e])^n; slices are independent,
    so a layer's expected distinct experts are Σ_e 1 - Π_slices q_n[l, e]."""

    def __init__(self, cfg: ModelConfig, hardware: Hardware, routing: RoutingModel | None,
                 calibration: Calibration | None = None):
        self.cfg = cfg
        self.cost_model = CostModel(cfg, hardware, calibration)
        E, k = max(cfg.num_experts, 1), cfg.num_experts_per_tok
        if isinstance(routing, PlackettLuceRouting):
            self._inclusion = routing.inclusion  # [L, C, E]
        else:  # traces and dense models: uniform inclusion k / E
            self._inclusion = np.full((cfg.num_layers, 1, E), k / E)
        self._log_unused: dict[int, np.ndarray] = {}  # n -> [L, E] log q_n

    def _log_q(self, n: int) -> np.ndarray:
        if n not in self._log_unused:
            q = ((1.0 - self._inclusion) ** n).mean(axis=1)
            self._log_unused[n] = np.log(np.maximum(q, 1e-300))
        return self._log_unused[n]

    def expected_distinct(self, plan: IterationPlan) -> np.ndarray:
        """[L] expected distinct experts activated by the plan's rows, per layer."""
        log_unused = np.zeros_like(self._inclusion[:, 0, :])  # [L, E]
        combos: dict[tuple[int, int, int], int] = {}
        for s in plan.slices:
            key = (s.num_tokens, s.layer_start, s.layer_end)
            combos[key] = combos.get(key, 0) + 1
        for (n, a, b), count in combos.items():
            log_unused[a:b] += count * self._log_q(n)[a:b]
        distinct = (1.0 - np.exp(log_unused)).sum(axis=1)
        return np.where(np.array(self.cfg.moe_layers), distinct, 0.0)

    def __call__(self, plan: IterationPlan) -> float:
        work = traffic.layer_work(self.cfg, plan)
        stats = traffic.layer_stats(self.cfg, plan, distinct_experts=self.expected_distinct(plan), work=work)
        return self.cost_model.price(plan, stats, work).seconds
