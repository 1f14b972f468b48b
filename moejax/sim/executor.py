"""SimExecutor: the Executor protocol with a cost model in place of the model.

For every layer group of a plan, each MoE layer's routing is drawn from a routing model for the rows
that pass it; `traffic.layer_stats` turns the drawn experts into the same per-layer bytes the real
executor reports, and the cost model prices them. Sampled rows get a fixed non-EOS token, so
requests run until max_tokens: output lengths come from the workload, not from sampling.
"""

from __future__ import annotations

import numpy as np

from moejax.config import ModelConfig
from moejax.engine import traffic
from moejax.engine.plan import IterationPlan, StepResult
from moejax.sim.cost_model import Calibration, CostModel
from moejax.sim.hardware import Hardware, get_hardware
from moejax.sim.routing import RoutingModel, make_routing, plan_expert_tokens


class SimExecutor:
    def __init__(self, config: ModelConfig, hardware: Hardware | str,
                 routing: RoutingModel | str | None = "uniform", seed: int = 0,
                 calibration: Calibration | None = None):
        """routing: a RoutingModel, or a name for make_routing (ignored for dense models).
        calibration: default is calibration.json's entry for the hardware."""
        self.config = config
        self.hardware = get_hardware(hardware) if isinstance(hardware, str) else hardware
        if config.num_experts == 0:
            self.routing = None
        elif routing is None:
            raise ValueError(f"{config.name} is an MoE model: SimExecutor needs a routing model")
        else:
            self.routing = make_routing(routing, config, seed) if isinstance(routing, str) else routing
        self.cost_model = CostModel(config, self.hardware, calibration)
        self.rng = np.random.default_rng(seed)
        self.sample_token = next(t for t in range(config.vocab_size) if t not in config.eos_token_ids)

    def execute(self, plan: IterationPlan) -> StepResult:
        cfg = self.config
        work = traffic.layer_work(cfg, plan)
        expert_tokens = None if self.routing is None else \
            plan_expert_tokens(cfg, plan, self.routing, self.rng)
        stats = traffic.layer_stats(cfg, plan, expert_tokens=expert_tokens, work=work)
        cost = self.cost_model.price(plan, stats, work)
        sampled = {s.request_id: self.sample_token for s in plan.slices if s.sample}
        extra = {"roofline_s": cost.roofline_s, "comm_s": cost.comm_s, "kernels": cost.kernels}
        return StepResult(sampled=sampled, elapsed_s=cost.seconds, layer_stats=stats, energy_j=cost.energy_j,
                          extra=extra)
