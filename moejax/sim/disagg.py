"""Decode-step time of an attention-expert disaggregated deployment (Janus, arXiv 2512.13525), and of
the colocated expert-parallel baseline, on one cost model.

A deployment is `attention_instances` devices running data-parallel attention (each its share of the
B decoding sequences: projections, attention over their KV, router, shared expert / dense MLP, the lm
head) and `moe_instances` devices holding `expert_slots` routed experts per MoE layer each (spare
slots hold replicas of hot experts, `activation_scheduler.place_replicas`). Per layer:

    a   attention instance time for B / (n_a · m) rows: roofline of its weights, KV read, FLOPs
    e   MoE time: every instance reads the weights of its distinct activated experts and computes
        its tokens; the layer waits for the busiest instance (max over instances, roofline each).
        Which replica serves an expert is the activation policy's choice (`janus`: fewest distinct
        experts on the busiest instance; `token`: token balancing)
    x   activation exchange: each row's hidden vector to its k experts and back (dispatch, combine),
        the busiest sender/receiver's bytes over the link (NVLink within one 8-GPU node, the
        scale-out NIC beyond)

Micro-batch ping-pong with m micro-batches: attention on micro-batch i overlaps exchange + MoE on
micro-batch i - 1, so a layer's steady-state period is max(m · max(a, x + e), a + x + e) with a, x,
e priced at the micro-batch size (m = 1: no overlap, a + x + e). Weights are read once per
micro-batch: more micro-batches hide more but read more. A step is the sum of the layer periods plus
the embedding / lm head on the attention side.

Colocated EP (SGLang-like DP attention + expert parallelism): the same devices do both, m = 1,
n_a = n_m = G; each device holds its attention weights, its expert slots and its KV.

Memory: an attention instance holds every non-expert weight and the KV of its sequences at their
full length; an MoE instance its expert slots of every MoE layer; both within MEMORY_FRACTION of the
device (the rest: activations, workspace, the runtime).

Routing: MoE time is drawn from a routing model (decode rows from distinct requests) at
`sample_layers` evenly spaced MoE layers and averaged: every MoE layer of these models has the same
shape, so the sample stands for all of them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from moejax.config import ModelConfig
from moejax.disagg.activation_scheduler import assign_activations, instance_load, place_replicas
from moejax.engine import traffic
from moejax.sim.cost_model import ATTENTION_KERNELS, HEAD_KERNELS, CostModel
from moejax.sim.hardware import GB, Hardware, Link
from moejax.sim.routing import PlackettLuceRouting, RoutingModel, Rows

MEMORY_FRACTION = 0.9
NODE_DEVICES = 8  # NVLink domain of an HGX node
# Scale-out between nodes: one 400 Gb/s NIC per GPU (ConnectX-7 NDR InfiniBand): 50 GB/s per direction.
SCALE_OUT = Link("ndr400", 50 * GB, 10e-6)
# Kernels of the routed experts on an MoE instance: token permute, gate_up grouped GEMM, activation, down.
EXPERT_KERNELS = 4


@dataclass(frozen=True)
class Deployment:
    system: str  # "janus" | "megascale" (fixed-ratio, token-balanced) | "colocated" (EP, SGLang-like)
    attention_instances: int
    moe_instances: int
    micro_batches: int
    expert_slots: int  # routed experts per MoE instance and MoE layer
    policy: str  # activation policy: "janus" or "token"

    @property
    def colocated(self) -> bool:
        return self.system == "colocated"

    @property
    def gpus(self) -> int:
        return self.attention_instances if self.colocated else self.attention_instances + self.moe_instances


@dataclass(frozen=True)
class StepCost:
    seconds: float  # one decode step (TPOT at this batch)
    attention_s: float  # Σ over layers of a, at the micro-batch size
    moe_s: float  # Σ of e
    exchange_s: float  # Σ of x
    max_distinct: float  # busiest MoE instance's distinct experts, mean over sampled layers and draws


class DisaggCostModel:
    """Prices decode steps of deployments of one model on one device type (hardware.device)."""

    def __init__(self, cfg: ModelConfig, hardware: Hardware, routing: RoutingModel, context_len: int,
                 max_len: int, sample_layers: int = 4, draws: int = 2, seed: int = 0):
        if cfg.num_experts == 0:
            raise ValueError(f"{cfg.name} has no routed experts: nothing to disaggregate")
        self.cfg, self.hw, self.routing = cfg, hardware, routing
        self.context_len, self.max_len = context_len, max_len
        self.draws, self.seed = draws, seed
        self.roof = CostModel(cfg, dataclasses.replace(hardware, count=1))  # one device's roofline
        moe = np.flatnonzero(cfg.moe_layers)
        self.moe_layers = moe[np.unique(np.linspace(0, len(moe) - 1, min(sample_layers, len(moe))).astype(int))]
        self._moe_cache: dict[tuple, tuple[float, float, float]] = {}
        self._replica_cache: dict[tuple[int, int], np.ndarray] = {}

    # --- sizes -----------------------------------------------------------------------------------------
    @cached_property
    def expert_bytes(self) -> float:
        """One routed expert of one layer."""
        return float(self.cfg.expert_params() * self.cfg.dtype_bytes)

    @cached_property
    def dense_bytes(self) -> float:
        """Every weight but the routed experts (attention side)."""
        cfg = self.cfg
        return traffic.model_bytes(cfg) - cfg.num_moe_layers * cfg.num_experts * self.expert_bytes

    @cached_property
    def kv_bytes_per_token(self) -> float:
        cfg = self.cfg
        return sum(cfg.kv_elems_per_token(i) for i in range(cfg.num_layers)) * cfg.dtype_bytes

    def max_expert_slots(self, colocated_batch: int | None = None) -> int:
        """Expert slots per MoE layer one device can hold (colocated: beside its attention weights and
        the KV of `colocated_batch` sequences)."""
        free = MEMORY_FRACTION * self.hw.device.memory_bytes
        if colocated_batch is not None:
            free -= self.dense_bytes + colocated_batch * self.max_len * self.kv_bytes_per_token
        return max(int(free // (self.cfg.num_moe_layers * self.expert_bytes)), 0)

    def attention_fits(self, batch_per_instance: np.ndarray) -> np.ndarray:
        free = MEMORY_FRACTION * self.hw.device.memory_bytes - self.dense_bytes
        return batch_per_instance * self.max_len * self.kv_bytes_per_token <= free

    # --- per-layer times ---------------------------------------------------------------------------------
    def _seconds(self, flops, nbytes, kernels):
        cal = self.roof.calibration
        return cal.scale * self.roof._roofline(flops, nbytes) + cal.kernel_overhead_s * kernels

    def attention_s(self, rows: np.ndarray) -> np.ndarray:
        """[..., L] seconds of each layer's attention side (attention, router, shared expert or dense
        MLP) on one device for `rows` [...] decode rows at the mean context length."""
        cfg, nb = self.cfg, self.cfg.dtype_bytes
        rows = np.asarray(rows, float)[..., None]
        shapes = traffic.layer_shapes(cfg)
        params = np.array([s.attn_params + s.dense_ffn_params for s in shapes], float)
        keys = np.array([min(self.context_len, s.window or self.context_len) for s in shapes], float)
        kv = np.array([s.kv_elems_per_token for s in shapes], float) * nb
        flops = 2.0 * rows * (params - traffic.kv_up_params(cfg)) \
            + traffic.attention_core_flops(cfg, rows, rows * keys, rows * keys)
        act = self.roof.attn_act_bytes + 4 * cfg.hidden_size * nb
        nbytes = params * nb + rows * keys * kv + rows * act
        moe = np.array(cfg.moe_layers)
        kernels = ATTENTION_KERNELS + np.where(moe, self.roof.layer_kernels - ATTENTION_KERNELS - EXPERT_KERNELS,
                                               self.roof.layer_kernels - ATTENTION_KERNELS)
        return self._seconds(flops, nbytes, kernels) * (rows > 0)

    def head_s(self, rows: np.ndarray) -> np.ndarray:
        """[...] embedding + lm head of `rows` sampled rows on one device."""
        V, D, nb = self.cfg.vocab_size, self.cfg.hidden_size, self.cfg.dtype_bytes
        rows = np.asarray(rows, float)
        return self._seconds(2.0 * V * D * rows, V * D * nb + rows * (V + 2 * D) * nb, 1 + HEAD_KERNELS)

    def expert_s(self, distinct: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """[...] routed-expert time of instances holding `distinct` activated experts and `tokens`
        token-expert pairs."""
        cfg, nb = self.cfg, self.cfg.dtype_bytes
        D, F = cfg.hidden_size, cfg.moe_intermediate_size
        flops = 2.0 * cfg.expert_params() * tokens
        nbytes = distinct * self.expert_bytes + tokens * (2 * D + 6 * F) * nb  # in/out rows, gate_up/act/down
        return self._seconds(flops, nbytes, EXPERT_KERNELS) * (distinct > 0)

    def link(self, gpus: int) -> Link:
        return self.hw.interconnect if gpus <= NODE_DEVICES else SCALE_OUT

    def _exchange_s(self, rows_out: float, rows_in: float, gpus: int) -> float:
        """Dispatch and combine: the busiest end's hidden rows over the link, both ways."""
        link = self.link(gpus)
        row = self.cfg.hidden_size * self.cfg.dtype_bytes
        return 2 * (link.latency_s + max(rows_out, rows_in) * row / link.effective_bandwidth)

    # --- replicas ----------------------------------------------------------------------------------------
    def expert_load(self, layers: np.ndarray | None = None) -> np.ndarray:
        """[len(layers), E] activation frequency per expert (default: at the sampled MoE layers), what a
        deployment's replica placement is fitted to: inclusion probabilities of Plackett-Luce routing,
        else the frequencies of a large draw."""
        layers = self.moe_layers if layers is None else np.asarray(layers)
        if isinstance(self.routing, PlackettLuceRouting):
            return self.routing.inclusion[layers].mean(axis=1)
        rows = _decode_rows(4096, np.random.default_rng([self.seed, 7]))
        return self.routing.draw_layers(layers, rows, np.random.default_rng(self.seed)) / 4096

    def replicas(self, moe_instances: int, expert_slots: int) -> np.ndarray:
        """[L_sampled, E, R] replica placement at the sampled layers."""
        key = (moe_instances, expert_slots)
        if key not in self._replica_cache:
            self._replica_cache[key] = place_replicas(self.expert_load(), moe_instances, expert_slots)
        return self._replica_cache[key]

    def _moe(self, moe_instances: int, expert_slots: int, policy: str, rows: int) -> tuple[float, float, float]:
        """(mean per-layer MoE seconds, mean max tokens on an instance, mean max distinct) for `rows`
        decode rows, over the sampled layers and draws (seeded by the arguments: reproducible)."""
        key = (moe_instances, expert_slots, policy, rows)
        if key not in self._moe_cache:
            replicas = self.replicas(moe_instances, expert_slots)
            rng = np.random.default_rng([self.seed, moe_instances, expert_slots, rows])
            seconds, max_tokens, max_distinct = [], [], []
            for _ in range(self.draws):
                tokens = self.routing.draw_layers(self.moe_layers, _decode_rows(rows, rng), rng)  # [Ls, E]
                assign = np.asarray(assign_activations(tokens, replicas, moe_instances, policy))
                distinct, load = instance_load(assign, tokens, moe_instances)  # [Ls, N]
                seconds.append(self.expert_s(distinct, load).max(axis=1))
                max_tokens.append(load.max(axis=1))
                max_distinct.append(distinct.max(axis=1))
            self._moe_cache[key] = tuple(float(np.mean(v)) for v in (seconds, max_tokens, max_distinct))
        return self._moe_cache[key]

    # --- a step ------------------------------------------------------------------------------------------
    def step(self, d: Deployment, batch: int) -> StepCost:
        """One decode step of `batch` sequences on deployment `d`."""
        cfg, m = self.cfg, d.micro_batches
        micro = max(batch // m, 1)
        attn_rows = micro / d.attention_instances
        a = self.attention_s(attn_rows)  # [L]
        e, max_tokens, max_distinct = self._moe(d.moe_instances, d.expert_slots, d.policy, micro)
        x = self._exchange_s(attn_rows * cfg.num_experts_per_tok, max_tokens, d.gpus)
        c = np.where(np.array(cfg.moe_layers), x + e, 0.0)
        period = np.maximum(m * np.maximum(a, c), a + c)
        seconds = float(period.sum() + m * self.head_s(attn_rows))
        n_moe = cfg.num_moe_layers
        return StepCost(seconds, float(a.sum()), e * n_moe, x * n_moe, max_distinct)


def _decode_rows(n: int, rng: np.random.Generator) -> Rows:
    """n decode rows of n distinct requests at random positions."""
    ids = rng.integers(0, 2**62, n)
    return Rows(ids.astype(np.int64), rng.integers(0, 2**31, n).astype(np.int64), np.ones(n, np.int64))
