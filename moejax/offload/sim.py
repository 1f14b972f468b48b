"""SimOffloadExecutor: expert offload on a cost model (build(config, "sim-offload", hardware=...)).

The simulator's routing model draws each MoE layer's experts; the real executor's Residency and load
scheduler decide hits, loads, host experts and prefetches from them; a timeline prices the decisions:

    device   attention, then (after the layer's loads arrive) its FFN -- the roofline's per-layer parts
    link     one expert per `expert_load_s` (the host link: PCIe 3/4/5 ...), in the order issued: a
             layer's on-demand loads when its routing is known, its prefetches when its FFN starts
    host     the host-computed experts, from the layer's routing on, beside the loads and the device's
             FFN (the layer ends when both are done)

The wait between a layer's routing and the arrival of every expert it needs that is loaded now or
was prefetched is its stall (a prefetch it does not need keeps arriving for a later pass). Loads still on the link when an iteration ends carry into the next. What a predictor
would guess is modelled from the drawn routing (`ModelledPredictor`), with the per-token recall a
trained predictor reached on real traces; lfru runs as it does for real, on the drawn history.
"""

from __future__ import annotations

import numpy as np

from moejax.config import ModelConfig, get_preset
from moejax.engine import traffic
from moejax.engine.kv_cache import kv_pool_blocks, state_slots_for
from moejax.engine.plan import IterationPlan, StepResult
from moejax.offload.config import OffloadConfig, offload_config
from moejax.offload.predictors import LFRU, Predictor, targets, vote_probability
from moejax.offload.residency import Residency
from moejax.offload.schedule import Costs, LoadScheduler
from moejax.sim.cost_model import Calibration
from moejax.sim.executor import SimExecutor
from moejax.sim.hardware import Hardware, get_hardware
from moejax.sim.routing import RoutingModel, make_routing, plan_expert_tokens

# Per-token top-k recall of stdlib-moe's predictors on held-out text, by distance (layer m from m-d):
# benchmarks/offload_predictors.json, "recall_by_distance" (mean over layers).
MEASURED_RECALL = {"gate-ahead": {1: 0.768, 2: 0.690}, "learned": {1: 0.860, 2: 0.831}}


class ModelledPredictor(Predictor):
    """A lookahead predictor in simulation: each token's expert at layer m is named with probability
    recall[d] (d = m - l), otherwise a random expert is; the batch's P follows from the votes as for a
    real top-k guess (`vote_probability`: a named expert is right about as often as the guess recalls)."""

    def __init__(self, name: str, moe_layers, num_experts: int, top_k: int, lookahead: int,
                 recall: dict[int, float], rng: np.random.Generator):
        super().__init__(moe_layers, num_experts, lookahead)
        self.name, self.top_k, self.recall, self.rng = name, top_k, recall, rng

    def predict_drawn(self, layer: int, expert_tokens: np.ndarray) -> dict[int, np.ndarray]:
        out = {}
        for m, d in targets(self.moe_layers, layer, self.lookahead):
            r = self.recall.get(d, 0.0)
            tokens = expert_tokens[m]
            named = self.rng.binomial(tokens, r)
            wrong = self.rng.multinomial(int((tokens - named).sum()), np.full(self.num_experts, 1 / self.num_experts))
            out[m] = vote_probability(named + wrong, tokens.sum() / self.top_k, r, self.top_k, self.num_experts)
        return out


class SimOffloadExecutor(SimExecutor):
    def __init__(self, config: ModelConfig, hardware: Hardware | str, offload: OffloadConfig,
                 routing: RoutingModel | str | None = "correlated", seed: int = 0,
                 calibration: Calibration | None = None, predictor_recall: dict[int, float] | None = None):
        super().__init__(config, hardware, routing=routing, seed=seed, calibration=calibration)
        cm, L, E = self.cost_model, config.num_layers, config.num_experts
        self.offload = offload
        if offload.predictor == "none":
            self.predictor = Predictor(config.moe_layers, E, offload.lookahead)
        elif offload.predictor == "lfru":
            self.predictor = LFRU(config.moe_layers, E, offload.lookahead)
        else:
            recall = predictor_recall if predictor_recall is not None else MEASURED_RECALL[offload.predictor]
            self.predictor = ModelledPredictor(offload.predictor, config.moe_layers, E, config.num_experts_per_tok,
                                               offload.lookahead, recall, np.random.default_rng([seed, 7]))
        self.residency = Residency(config.moe_layers, E, offload.slots, cm.expert_bytes,
                                   LoadScheduler(offload.load_rule, offload.host_compute))
        self.load_s = cm.expert_load_s()
        self.host_s = cm.host_expert_s if offload.host_compute else None
        self._arrive = [dict() for _ in range(L)]  # per layer: slot -> when its staged load arrives
        self._link_free = 0.0  # when the link finishes what it carries (from the iteration's start)

    def execute(self, plan: IterationPlan) -> StepResult:
        cfg = self.config
        work = traffic.layer_work(cfg, plan)
        expert_tokens = plan_expert_tokens(cfg, plan, self.routing, self.rng)
        stats = traffic.layer_stats(cfg, plan, expert_tokens=expert_tokens, work=work)
        cost = self.cost_model.price(plan, stats, work)
        before = self.residency.stats.counters["stall_s"].sum(), self.residency.stats.counters["bytes_h2d"].sum()
        layers_s = self._timeline(plan, expert_tokens, cost)
        stall = self.residency.stats.counters["stall_s"].sum() - before[0]
        seconds = cost.seconds - float(cost.layer_s.sum()) + layers_s
        energy = cost.energy_j + self.hardware.device.static_w * self.hardware.count * stall  # idle while waiting
        sampled = {s.request_id: self.sample_token for s in plan.slices if s.sample}
        extra = {"roofline_s": cost.roofline_s, "comm_s": cost.comm_s, "kernels": cost.kernels,
                 "offload_stall_s": float(stall),
                 "offload_bytes_h2d": float(self.residency.stats.counters["bytes_h2d"].sum() - before[1])}
        return StepResult(sampled, seconds, stats.total_expert_bytes, stats=stats, energy_j=energy, extra=extra)

    def offload_summary(self) -> dict:
        o, hw = self.offload, self.hardware
        return {**self.residency.stats.summary(), "slots": o.slots, "num_experts": self.config.num_experts,
                "predictor": self.predictor.name, "load_rule": o.load_rule, "host_compute": o.host_compute,
                "lookahead": o.lookahead, "expert_bytes": self.cost_model.expert_bytes, "host_link": hw.host_link.name,
                "expert_load_s": self.load_s, "predictor_recall": getattr(self.predictor, "recall", None)}

    def _windows(self, cost) -> np.ndarray:
        """[L] device time from each MoE layer's FFN to the next MoE layer's routing."""
        moe = np.flatnonzero(self.config.moe_layers)
        window = np.zeros(self.config.num_layers)
        for l, nxt in zip(moe, list(moe[1:]) + [None]):
            window[l] = cost.ffn_s[l] + (0.0 if nxt is None else cost.layer_s[l + 1:nxt].sum() + cost.attn_s[nxt])
        return window

    def _timeline(self, plan: IterationPlan, expert_tokens: np.ndarray, cost) -> float:
        """The plan's layers on the device, link and host clocks -> seconds until the last layer is done."""
        cfg, cm = self.config, self.cost_model
        costs = Costs(self.load_s, self._windows(cost), self.host_s)
        read_s = cm.expert_read_s()
        t, link = 0.0, self._link_free
        for group in plan.groups:
            for l in range(group.layer_start, group.layer_end):
                t += cost.attn_s[l]
                if not cfg.moe_layers[l]:
                    t += cost.ffn_s[l]
                    continue
                tokens = expert_tokens[l]
                predictions = self.predictor.predict_drawn(l, expert_tokens) \
                    if isinstance(self.predictor, ModelledPredictor) else self.predictor.predict(l, None, None, None)
                self.predictor.observe(l, tokens > 0)
                loads = self.residency.layer_pass(l, tokens, predictions, costs, keep=self.predictor.keep(l))
                for _, s in loads.cached:  # an on-demand load replaces whatever was on its way to the slot
                    self._arrive[l].pop(s, None)
                # the layer waits for the prefetches it needs; the others keep arriving for a later pass
                needed = {int(self.residency.slot_of[l, e]) for e in np.flatnonzero(tokens)} - {-1}
                ready = max([t, *(a for s, a in self._arrive[l].items() if s in needed)])
                self._arrive[l] = {s: a for s, a in self._arrive[l].items() if s not in needed}
                if loads.on_demand:
                    link = max(link, t) + len(loads.on_demand) * self.load_s
                    ready = max(ready, link)
                self.residency.stats.add(l, stall_s=ready - t)
                ffn_s = max(cost.ffn_s[l] - len(loads.host) * read_s, 0.0)  # host experts are not read on the device
                # the host starts once the routing is known (it holds every expert), beside the loads
                host_done = t + float(self.host_s(tokens[loads.host]).sum()) if loads.host else 0.0
                for m, _, s in loads.prefetch:  # issued as the FFN starts, behind whatever is on the link
                    link = max(link, ready) + self.load_s
                    self._arrive[m][s] = link
                t = max(ready + ffn_s, host_done)
        self._link_free = max(0.0, link - t)
        self._arrive = [{s: max(0.0, a - t) for s, a in arrive.items()} for arrive in self._arrive]
        return t


def resident_bytes(cfg: ModelConfig, slots: int) -> float:
    """Device bytes of a model with `slots` experts per MoE layer cached, plus one layer's worth of
    transient experts (a pass needing all E)."""
    expert = cfg.expert_params() * cfg.dtype_bytes
    return traffic.model_bytes(cfg) - (cfg.num_experts - slots) * cfg.num_moe_layers * expert \
        + cfg.num_experts * expert


# --- construction (moejax.engine.build(..., "sim-offload")) -----------------------------------------------

def create(model, *, max_num_seqs: int, max_model_len: int | None, block_size: int, seed: int = 0,
           hardware: str | Hardware, host_link: str | None = None, routing: str | RoutingModel = "correlated",
           routing_params: dict | None = None, calibration: Calibration | None = None, memory_fraction: float = 0.9,
           offload_experts: float | None = None, device_expert_slots: int | None = None, predictor: str = "none",
           predictor_recall: dict[int, float] | None = None, load_rule: str = "presched", host_compute: bool = False,
           lookahead: int = 2, state_slots: int | None = None):
    """A SimOffloadExecutor for `model` (a preset name, ModelConfig or Model) on `hardware` (its host link
    replaced by `host_link`, e.g. "pcie3"); the KV cache gets what the device memory holds after the
    non-expert weights, the cached experts and one layer of transient experts, sized as the sim
    executor sizes it (kv_cache.kv_pool_blocks: window pools, state slots)."""
    from moejax.engine.factory import Built

    cfg = get_preset(model) if isinstance(model, str) else model if isinstance(model, ModelConfig) else model.config
    offload = offload_config(cfg, offload_experts=offload_experts, device_expert_slots=device_expert_slots,
                             predictor=predictor, load_rule=load_rule, host_compute=host_compute, lookahead=lookahead)
    hw = get_hardware(hardware) if isinstance(hardware, str) else hardware
    if host_link is not None:
        hw = hw.with_host_link(host_link)
    if routing_params:
        routing = make_routing(routing, cfg, seed, **routing_params)
    executor = SimOffloadExecutor(cfg, hw, offload, routing=routing, seed=seed, calibration=calibration,
                                  predictor_recall=predictor_recall)
    free = memory_fraction * hw.memory_bytes - resident_bytes(cfg, offload.slots)
    if free <= 0:
        raise ValueError(f"{cfg.name} with device_expert_slots={offload.slots} ({resident_bytes(cfg, offload.slots) / 1e9:.1f}"
                         f" GB on the device) does not fit {hw.name} ({hw.memory_bytes / 1e9:.0f} GB): cache fewer experts")
    max_model_len = max_model_len or cfg.max_position
    state_slots = state_slots_for(cfg, max_num_seqs, state_slots)
    num_blocks = kv_pool_blocks(cfg, block_size, int(free), max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                                state_slots=state_slots)
    return Built(executor, num_blocks, max_model_len, virtual_time=True, state_slots=state_slots)
