"""SimExecutor: the Executor protocol with a cost model in place of the model.

For every layer group of a plan, each MoE layer's routing is drawn from a routing model for the rows
that pass it; `traffic.layer_stats` turns the drawn experts into the same per-layer bytes the real
executor reports, and the cost model prices them. Sampled rows get a fixed non-EOS token, so
requests run until max_tokens: output lengths come from the workload, not from sampling.

KV hand-off is simulated too: an exported payload carries the shapes and dtype of the request's KV
(and of the state slots of Gated DeltaNet layers: what a link would carry), no values.
"""

from __future__ import annotations

import jax
import numpy as np

from moejax.config import ModelConfig, get_preset
from moejax.engine import traffic
from moejax.engine.kv_cache import kv_pool_blocks, state_slots_for
from moejax.engine.kv_transfer import KVPayload, LayerKVState, kv_layout, layer_kv_state, payload_shape
from moejax.engine.plan import IterationPlan, StepResult
from moejax.sim.cost_model import Calibration, CostModel
from moejax.sim.hardware import Hardware, get_hardware
from moejax.sim.pricing import ExpectedPricer
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
        self.kv_dtype = config.dtype
        self.max_decode_steps = 1  # modelled time is the same either way; one step per plan
        # what a scheduler deciding ahead can know: the cost of a plan under expected routing
        self.pricer = ExpectedPricer(config, self.hardware, self.routing, self.cost_model.calibration)

    def attach(self, policy) -> None:
        pass  # nothing kept between iterations

    def export_kv(self, block_ids: tuple[int, ...], num_tokens: int,
                  group_block_ids: tuple[tuple[int, ...], ...] = (), state_slot: int | None = None,
                  layers: range | None = None) -> KVPayload:
        cfg = self.config
        states = []
        layers = range(cfg.num_layers) if layers is None else layers
        for layer in layers:
            layout, n = layer_kv_state(cfg, layer, num_tokens)
            states.append(LayerKVState(layout.kind, {a.name: jax.ShapeDtypeStruct(*payload_shape(layout, a, n, cfg.dtype))
                                                     for a in layout.arrays}))
        return KVPayload(cfg.name, kv_layout(cfg, cfg.dtype), num_tokens, tuple(layers), tuple(states))

    def execute(self, plan: IterationPlan) -> StepResult:
        cfg = self.config
        work = traffic.layer_work(cfg, plan)
        expert_tokens = None if self.routing is None else \
            plan_expert_tokens(cfg, plan, self.routing, self.rng)
        stats = traffic.layer_stats(cfg, plan, expert_tokens=expert_tokens, work=work)
        cost = self.cost_model.price(plan, stats, work)
        sampled = {s.request_id: self.sample_token for s in plan.slices if s.sample}
        extra = {"roofline_s": cost.roofline_s, "comm_s": cost.comm_s, "kernels": cost.kernels}
        return StepResult(sampled, cost.seconds, stats.total_expert_bytes, stats=stats, energy_j=cost.energy_j,
                          extra=extra)


# --- construction (moejax.engine.build(..., "sim")) --------------------------------------------------------

def create(model, *, max_num_seqs: int, max_model_len: int | None, block_size: int, seed: int = 0,
           hardware: str | Hardware, routing: str | RoutingModel = "correlated", routing_params: dict | None = None,
           calibration: Calibration | None = None, memory_fraction: float = 0.9, state_slots: int | None = None):
    """A SimExecutor for `model` (a preset name, a ModelConfig or a Model: only its config counts) on
    `hardware`; KV capacity is what the hardware's memory holds after the weights, as the JAX executor
    sizes it (kv_cache.kv_pool_blocks: sliding-window layers get a smaller pool; Gated DeltaNet layers'
    state slots, one per request that may run at once or `state_slots`, come first). routing_params:
    e.g. {"affinity": 5.0} for "correlated" (see make_routing)."""
    from moejax.engine.factory import Built

    cfg = get_preset(model) if isinstance(model, str) else model if isinstance(model, ModelConfig) else model.config
    if routing_params and cfg.num_experts:
        routing = make_routing(routing, cfg, seed, **routing_params)
    executor = SimExecutor(cfg, hardware, routing=routing if cfg.num_experts else None, seed=seed,
                           calibration=calibration)
    state_slots = state_slots_for(cfg, max_num_seqs, state_slots)
    free = memory_fraction * executor.hardware.memory_bytes - traffic.model_bytes(cfg)
    if free <= 0:
        raise ValueError(f"{cfg.name} ({traffic.model_bytes(cfg) / 1e9:.1f} GB of weights) does not fit "
                         f"{executor.hardware.name} ({executor.hardware.memory_bytes / 1e9:.0f} GB)")
    max_model_len = max_model_len or cfg.max_position
    num_blocks = kv_pool_blocks(cfg, block_size, int(free), max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                                state_slots=state_slots)
    return Built(executor, num_blocks, max_model_len, virtual_time=True, state_slots=state_slots)
