"""SLO-aware planner (Janus, arXiv 2512.13525): how many attention instances, how many MoE instances,
how many micro-batches and which expert replicas meet a TPOT target at a request rate with the
fewest GPUs, priced by `moejax.sim.disagg.DisaggCostModel`.

Demand: `rate` requests/s of `output_len` tokens each need rate · output_len tokens/s of decode.
A deployment serves it within the SLO when at some batch B its step time is <= slo_tpot and
B / step >= the demand: at that demand the concurrency settles at or below B (Little's law), where a
step is no slower (step time grows with B). Batches are searched on a geometric grid of micro-batch
sizes (shared by all deployments, so the MoE pricing is cached across them).

Systems, all priced by the same cost model:
    janus      attention and MoE instance counts chosen independently, spare expert slots filled
               with replicas of hot experts, the activation scheduler (fewest distinct experts on
               the busiest instance), 1..3 micro-batches
    megascale  MegaScale-Infer-like: disaggregated at a fixed attention:MoE instance ratio, the same
               replicas served token-balanced (EPLB-like), 1..3 micro-batches
    colocated  SGLang-like DP attention + expert parallelism on the same G devices (G divides the
               experts: each device holds E / G), no replicas, no micro-batch overlap

An SLO no deployment within `max_gpus` meets gives a plan with feasible=False and the closest
deployment: the most tokens/s within the SLO if the rate is what is out of reach, else the lowest
step time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from moejax.config import ModelConfig
from moejax.disagg.activation_scheduler import place_replicas
from moejax.meshes import Layout, SplitLayout
from moejax.sim.disagg import Deployment, DisaggCostModel, StepCost

SYSTEMS = ("janus", "megascale", "colocated")
# Micro-batch sizes (decode rows per micro-batch) the search tries: 2^(i/2), 1 .. 16384.
MICRO_BATCH_GRID = np.unique(np.round(2.0 ** (np.arange(0, 29) / 2)).astype(int))
# Instance counts the search tries: every count to 16, then steps of 2 to 32, of 4 to 64, of 8 beyond.
INSTANCE_COUNTS = (*range(1, 17), *range(18, 33, 2), *range(36, 65, 4), *range(72, 1025, 8))


@dataclass
class Plan:
    system: str
    deployment: Deployment
    batch: int  # decode sequences at the operating point
    step: StepCost
    feasible: bool
    demand_tokens_s: float
    note: str = ""
    replicas: np.ndarray | None = field(default=None, repr=False)  # [L_moe, E, R] over every MoE layer

    @property
    def tokens_s(self) -> float:
        return self.batch / self.step.seconds

    @property
    def tokens_s_per_gpu(self) -> float:
        return self.tokens_s / self.deployment.gpus

    def layout(self) -> Layout | SplitLayout:
        """The deployment as a device layout: an attention/experts SplitLayout (the disaggregated
        executor runs it; tiny models on 8 CPU devices) or, colocated, one DP + EP layout."""
        d = self.deployment
        if d.colocated:
            return Layout(f"ep{d.gpus}", {"data": d.gpus}, {"batch": "data", "expert": "data"})
        return SplitLayout(f"{d.system}-attn{d.attention_instances}-exp{d.moe_instances}", "attention_expert", {
            "attention": Layout("attn", {"data": d.attention_instances}, {"batch": "data"}),
            "experts": Layout("exp", {"expert": d.moe_instances}, {"expert": "expert"})})

    def to_dict(self) -> dict:
        d, s = self.deployment, self.step
        layout = self.layout()
        parts = layout.parts if isinstance(layout, SplitLayout) else {"all": layout}
        out = {
            "system": self.system, "feasible": self.feasible, "note": self.note,
            "gpus": d.gpus, "attention_instances": d.attention_instances, "moe_instances": d.moe_instances,
            "micro_batches": d.micro_batches, "expert_slots_per_instance": d.expert_slots,
            "activation_policy": d.policy, "batch": self.batch, "tpot_s": s.seconds,
            "tokens_s": self.tokens_s, "tokens_s_per_gpu": self.tokens_s_per_gpu,
            "demand_tokens_s": self.demand_tokens_s,
            "step": {"attention_s": s.attention_s, "moe_s": s.moe_s, "exchange_s": s.exchange_s,
                     "max_distinct_experts": s.max_distinct},
            "layout": {"name": layout.name, "kind": getattr(layout, "kind", "single"),
                       "parts": {r: {"axes": p.axes, "rules": {k: list(v) for k, v in p.rules.items()}}
                                 for r, p in parts.items()}},
        }
        if self.replicas is not None:
            out["replicas_per_expert_mean"] = float((self.replicas >= 0).sum(-1).mean())
            out["placement"] = [[np.flatnonzero((layer == i).any(-1)).tolist() for i in range(d.moe_instances)]
                                for layer in self.replicas]  # per MoE layer, per instance: its experts
        return out


class Planner:
    """Searches deployments of one model on one device type (cost model) at one TPOT SLO."""

    def __init__(self, cost_model: DisaggCostModel, slo_tpot: float, max_gpus: int = 64,
                 micro_batches: tuple[int, ...] = (1, 2, 3), megascale_ratio: float = 1.0):
        if slo_tpot <= 0:
            raise ValueError(f"slo_tpot must be > 0 seconds, got {slo_tpot}")
        if max_gpus < 2:
            raise ValueError(f"max_gpus must be >= 2 (one attention and one MoE instance), got {max_gpus}")
        self.cm, self.slo, self.max_gpus = cost_model, slo_tpot, max_gpus
        self.micro_batches, self.megascale_ratio = micro_batches, megascale_ratio
        self._curves: dict[str, list[tuple[Deployment, np.ndarray, list[StepCost]]]] = {}

    @property
    def cfg(self) -> ModelConfig:
        return self.cm.cfg

    def deployments(self, system: str) -> list[Deployment]:
        """Every deployment of `system` within max_gpus whose experts fit."""
        if system not in SYSTEMS:
            raise ValueError(f"unknown system {system!r}; systems: {', '.join(SYSTEMS)}")
        E, G = self.cfg.num_experts, self.max_gpus
        out = []
        if system == "colocated":
            for g in (n for n in INSTANCE_COUNTS if n <= G and E % n == 0):  # experts shard evenly, as
                slots = E // g                                                 # meshes.Layout requires
                if slots <= self.cm.max_expert_slots(colocated_batch=0):
                    out.append(Deployment("colocated", g, g, 1, slots, "token"))
            return out
        max_slots = min(self.cm.max_expert_slots(), E)
        for n_m in (n for n in INSTANCE_COUNTS if n < G):
            if n_m * max_slots < E:
                continue
            attention = [n for n in INSTANCE_COUNTS if n <= G - n_m] if system == "janus" else \
                [max(1, round(self.megascale_ratio * n_m))]
            for n_a in attention:
                if n_a + n_m > G:
                    continue
                for m in self.micro_batches:
                    out.append(Deployment(system, n_a, n_m, m, max_slots, "janus" if system == "janus" else "token"))
        return out

    def curves(self, system: str) -> list[tuple[Deployment, np.ndarray, list[StepCost]]]:
        """Per deployment: the batches it can hold in memory (from the grid) and their step costs."""
        if system not in self._curves:
            curves = []
            for d in self.deployments(system):
                batches = d.micro_batches * MICRO_BATCH_GRID
                per_gpu = batches / d.attention_instances
                fits = self.cm.attention_fits(per_gpu)
                if d.colocated:  # the experts share the device with the KV
                    fits &= np.array([d.expert_slots <= self.cm.max_expert_slots(colocated_batch=int(np.ceil(b)))
                                      for b in per_gpu])
                batches = batches[fits]
                if len(batches):
                    curves.append((d, batches, [self.cm.step(d, int(b)) for b in batches]))
            self._curves[system] = curves
        return self._curves[system]

    def _plan(self, system, d, batch, step, feasible, demand, note) -> Plan:
        replicas = None
        if not d.colocated:
            load = self.cm.expert_load(np.flatnonzero(self.cfg.moe_layers))
            replicas = place_replicas(load, d.moe_instances, d.expert_slots)
        return Plan(system, d, int(batch), step, feasible, demand, note, replicas)

    def plan(self, rate: float, output_len: int, system: str = "janus") -> Plan:
        """Fewest GPUs serving `rate` requests/s of `output_len` tokens within the SLO (ties: the
        most throughput), or the closest deployment marked infeasible."""
        if rate <= 0 or output_len <= 0:
            raise ValueError(f"rate and output_len must be > 0, got rate={rate}, output_len={output_len}")
        demand = rate * output_len
        best, within = None, None  # (gpus, -tokens/s) minimal; the most tokens/s within the SLO
        fastest = None
        for d, batches, steps in self.curves(system):
            for b, s in zip(batches, steps):
                if fastest is None or s.seconds < fastest[2].seconds:
                    fastest = (d, b, s)
                if s.seconds > self.slo:
                    continue
                tput = b / s.seconds
                if within is None or (tput, -d.gpus) > (within[1], -within[0].gpus):
                    within = (d, tput, b, s)
                if tput >= demand:
                    key = (d.gpus, -tput)
                    if best is None or key < best[0]:
                        best = (key, d, b, s)
                    break  # the smallest batch meeting the demand is the operating point
        if best is not None:
            _, d, b, s = best
            return self._plan(system, d, b, s, True, demand, "")
        if fastest is None:
            raise ValueError(f"no {system} deployment of {self.cfg.name} fits {self.max_gpus} "
                             f"{self.cm.hw.device.name} devices")
        if within is not None:
            d, tput, b, s = within
            note = (f"infeasible: {demand:.0f} tokens/s needed, at most {tput:.0f} within TPOT {self.slo} s on "
                    f"{self.max_gpus} GPUs (closest: the most tokens/s within the SLO)")
            return self._plan(system, d, b, s, False, demand, note)
        d, b, s = fastest
        note = (f"infeasible: no deployment reaches TPOT {self.slo} s; the fastest step is "
                f"{s.seconds:.4f} s (closest: that deployment)")
        return self._plan(system, d, b, s, False, demand, note)

    def best_per_gpu(self, system: str) -> Plan | None:
        """The deployment and batch with the most tokens/s per GPU within the SLO (None: none meets it)."""
        best = None
        for d, batches, steps in self.curves(system):
            for b, s in zip(batches, steps):
                if s.seconds <= self.slo and (best is None or b / s.seconds / d.gpus > best[0]):
                    best = (b / s.seconds / d.gpus, d, b, s)
        if best is None:
            return None
        _, d, b, s = best
        return self._plan(system, d, b, s, True, 0.0, "most tokens/s per GPU within the SLO")
