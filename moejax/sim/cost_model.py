"""Roofline cost of an iteration: modelled seconds and joules from the plan's bytes and FLOPs.

Per layer and per device two kernel families run one after the other: attention (q/k/v/o
projections, attention over the KV it reads and writes) and the FFN (router, dense MLP or shared
expert, routed experts). Compute and memory traffic overlap within a family, not across. Each
family takes the longest of three roofs:

    compute  FLOPs / (peak · flop_efficiency)
    memory   bytes / (bandwidth · bandwidth_efficiency)
    power    dynamic energy / (TDP − static power): a device cannot draw more than its TDP, so a
             kernel near both the compute and the memory roof runs at capped clocks (binds mostly
             on H200, whose bandwidth grew while its power budget did not)

Bytes are `traffic.layer_stats` (weights of the activated experts, dense weights, KV read and
written; Gated DeltaNet layers: their state slots) plus activations. Tensor parallelism over
`hw.count` devices splits weights and FLOPs, splits KV over min(count, kv heads) (MLA's latent KV is
replicated; Gated DeltaNet states split over value heads), and adds two all-reduces of the layer's
hidden rows per layer (after attention, after the FFN). Per iteration: the embedding
(vocab-parallel, so an all-reduce under TP) and the lm head on the sampled rows (vocab-parallel,
logits all-gathered).

    seconds = scale · Σ roofline + Σ communication + kernel_overhead_s · kernels
    joules  = pj_per_flop · FLOPs + pj_per_byte · device-memory bytes + static_w · count · seconds

`scale` and `kernel_overhead_s` are the calibration: one entry per hardware name in
calibration.json (else its "default" entry), fitted to measured iterations by `fit_calibration`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from moejax.config import ModelConfig
from moejax.engine import traffic
from moejax.engine.plan import IterationPlan, LayerStats, StepResult
from moejax.sim.hardware import Hardware

CALIBRATION_PATH = Path(__file__).with_name("calibration.json")

# Kernels launched per layer, counted on vLLM's CUDA path (fused where vLLM fuses):
# attention: fused residual+norm, qkv proj, q/k norm, rope, kv-cache write, attention, o proj;
# MoE: fused residual+norm, router, top-k softmax, token align/permute, gate_up grouped GEMM,
# activation, down grouped GEMM, weighted sum; dense MLP: norm, gate_up, activation, down;
# a shared expert adds gate_up, activation, down (+ its sigmoid gate).
ATTENTION_KERNELS = 7
MOE_KERNELS = 8
DENSE_MLP_KERNELS = 4
SHARED_EXPERT_KERNELS = 3
EMBED_KERNELS = 1  # embedding gather
HEAD_KERNELS = 4  # final norm, lm head, softmax / top-p filter, sampling


@dataclass(frozen=True)
class Calibration:
    scale: float = 1.0  # multiplies the roofline time (1 / achieved-efficiency correction)
    kernel_overhead_s: float = 3e-6  # per kernel: launch + small-kernel ramp/tail
    source: str = "built-in default"


def load_calibration(hardware_name: str, path: str | Path = CALIBRATION_PATH) -> Calibration:
    """The calibration of `hardware_name` from the JSON file, else its "default" entry."""
    entries = json.loads(Path(path).read_text())
    entry = entries.get(hardware_name, entries["default"])
    return Calibration(**entry)


def save_calibration(hardware_name: str, calibration: Calibration,
                     path: str | Path = CALIBRATION_PATH) -> None:
    """Write (or replace) the entry of `hardware_name`, keeping the others."""
    path = Path(path)
    entries = json.loads(path.read_text()) if path.exists() else {"default": asdict(Calibration())}
    entries[hardware_name] = asdict(calibration)
    path.write_text(json.dumps(entries, indent=2) + "\n")


@dataclass
class IterationCost:
    seconds: float
    energy_j: float
    roofline_s: float  # Σ max(compute, memory, power) over kernel families, before calibration scale
    comm_s: float  # all-reduces / all-gathers over the interconnect
    kernels: int
    flops: float  # all devices
    hbm_bytes: float  # all devices
    layer_s: np.ndarray  # [L] modelled seconds per layer (calibrated, communication and overhead in)
    attn_s: np.ndarray  # [L] of which the attention block (and its all-reduce): what precedes routing
    ffn_s: np.ndarray  # [L] of which the FFN: router, experts, shared expert / dense MLP (and its all-reduce)


class CostModel:
    """Prices plans for one model on one machine; per-layer constants are computed once."""

    def __init__(self, cfg: ModelConfig, hardware: Hardware, calibration: Calibration | None = None):
        self.cfg, self.hw = cfg, hardware
        self.calibration = calibration or load_calibration(hardware.name)
        n, D, nb = hardware.count, cfg.hidden_size, cfg.dtype_bytes
        shapes = traffic.layer_shapes(cfg)
        self.attn_weight_bytes = np.array([s.attn_params for s in shapes], float) * nb  # [L]
        linear = np.array(cfg.linear_layers)
        heads = cfg.linear_attention.num_value_heads if cfg.linear_attention else 1
        self.kv_split = np.where(linear, min(n, heads), 1 if cfg.attention_kind == "mla" else min(n, cfg.num_kv_heads))
        self.attn_act_bytes, self.ffn_act_bytes = (a * nb for a in self._activation_elems())  # [L] per token
        moe = np.array(cfg.moe_layers)
        shared = (SHARED_EXPERT_KERNELS + cfg.shared_expert_gate) if cfg.shared_expert_intermediate_size else 0
        self.layer_kernels = ATTENTION_KERNELS + np.where(moe, MOE_KERNELS + shared, DENSE_MLP_KERNELS)  # [L]
        self.hidden_row_bytes = D * nb

    def _activation_elems(self) -> tuple[np.ndarray, np.ndarray]:
        """[L] attention and [L] FFN activation elements moved per token on one device: each matmul
        reads its input rows and writes its output rows, norms and residual adds take ~4 D passes;
        hidden rows (D) are replicated across TP devices, head/intermediate dimensions split."""
        cfg, n = self.cfg, self.hw.count
        D, E, k = cfg.hidden_size, cfg.num_experts, cfg.num_experts_per_tok
        kv = max(cfg.kv_elems_per_token(i) for i in range(cfg.num_layers))
        q = cfg.q_size / n
        attn = 4 * D + (D + q + kv / n) + 2 * q + (q + D)  # norm/residual, qkv, attention, o proj
        if cfg.linear_attention:  # Gated DeltaNet: norm/residual, in projections, conv, gated norm, out proj
            s = cfg.linear_attention
            linear = 4 * D + (D + (2 * s.key_dim + 2 * s.value_dim + 2 * s.num_value_heads) / n) \
                + 2 * s.conv_dim / n + 3 * s.value_dim / n + (s.value_dim / n + D)
            attn = np.where(np.array(cfg.linear_layers), linear, attn)

        def mlp(F):  # gate_up, activation, down
            return (D + 2 * F / n) + 3 * F / n + (F / n + D)

        moe = 4 * D + (D + E) + k * (mlp(cfg.moe_intermediate_size) + D)  # router; k copies; combine
        if cfg.shared_expert_intermediate_size:
            moe += mlp(cfg.shared_expert_intermediate_size)
        dense = 4 * D + mlp(cfg.dense_intermediate_size)
        L = cfg.num_layers
        return np.broadcast_to(np.asarray(attn, float), (L,)), np.where(np.array(cfg.moe_layers), moe, dense).astype(float)

    def _roofline(self, flops, nbytes):
        """Seconds of one device's kernel family: compute, memory and power roofs."""
        dev = self.hw.device
        power_s = 1e-12 * (dev.pj_per_flop * flops + dev.pj_per_byte * nbytes) / (dev.tdp_w - dev.static_w)
        return np.maximum(np.maximum(flops / (dev.peak_flops * dev.flop_efficiency),
                                     nbytes / (dev.mem_bandwidth * dev.bandwidth_efficiency)), power_s)

    def _all_reduce_s(self, nbytes):
        n, link = self.hw.count, self.hw.interconnect
        return link.latency_s + 2 * (n - 1) / n * nbytes / link.effective_bandwidth

    def price(self, plan: IterationPlan, stats: LayerStats,
              work: traffic.LayerWork | None = None) -> IterationCost:
        """Seconds and joules of `plan` whose per-layer traffic is `stats` (from
        traffic.layer_stats with the experts a router or a routing model chose)."""
        cfg, hw, cal = self.cfg, self.hw, self.calibration
        n, nb = hw.count, cfg.dtype_bytes
        work = work if work is not None else traffic.layer_work(cfg, plan)
        attn_flops, ffn_flops = traffic.layer_flops_parts(cfg, plan, work)  # [L] each
        tokens = work.tokens
        ran = tokens > 0
        attn_w = self.attn_weight_bytes * ran
        # per device
        attn_bytes = attn_w / n + (stats.kv_read_bytes + stats.kv_write_bytes) / self.kv_split \
            + tokens * self.attn_act_bytes
        ffn_bytes = (stats.expert_bytes + stats.dense_weight_bytes - attn_w) / n + tokens * self.ffn_act_bytes
        attn_roof, ffn_roof = self._roofline(attn_flops / n, attn_bytes), self._roofline(ffn_flops / n, ffn_bytes)
        layer_roof = attn_roof + ffn_roof
        layer_comm = np.where(ran, 2 * self._all_reduce_s(tokens * self.hidden_row_bytes), 0.0) if n > 1 \
            else np.zeros(cfg.num_layers)
        layer_kernels = self.layer_kernels * ran

        # embedding of the rows that start at layer 0, lm head on the sampled ones
        embedded = sum(s.num_tokens for s in plan.slices if s.layer_start == 0)
        sampled = sum(1 for s in plan.slices if s.sample)
        V, D = cfg.vocab_size, cfg.hidden_size
        head_flops = 2.0 * V * D * sampled  # all devices
        lm_head_bytes = (V * D * nb + sampled * V * nb) if sampled else 0  # weights, logits
        head_bytes = (2 * embedded * D * nb + lm_head_bytes) / n  # per device
        head_roof = float(self._roofline(head_flops / n, head_bytes))
        head_comm = 0.0
        if n > 1 and embedded:
            head_comm += self._all_reduce_s(embedded * D * nb)
        if n > 1 and sampled:
            link = hw.interconnect  # all-gather of the vocab-parallel logits
            head_comm += link.latency_s + (n - 1) / n * sampled * V * nb / link.effective_bandwidth
        head_kernels = EMBED_KERNELS * (embedded > 0) + HEAD_KERNELS * (sampled > 0)

        roofline_s = float(layer_roof.sum()) + head_roof
        comm_s = float(layer_comm.sum()) + head_comm
        kernels = int(layer_kernels.sum()) + head_kernels
        seconds = cal.scale * roofline_s + comm_s + cal.kernel_overhead_s * kernels
        flops = float(attn_flops.sum() + ffn_flops.sum()) + head_flops
        hbm_bytes = n * (float(attn_bytes.sum() + ffn_bytes.sum()) + head_bytes)
        dev = hw.device
        energy = 1e-12 * (dev.pj_per_flop * flops + dev.pj_per_byte * hbm_bytes) + dev.static_w * n * seconds
        layer_s = cal.scale * layer_roof + layer_comm + cal.kernel_overhead_s * layer_kernels
        attn_s = cal.scale * attn_roof + layer_comm / 2 + cal.kernel_overhead_s * ATTENTION_KERNELS * ran
        return IterationCost(seconds, energy, roofline_s, comm_s, kernels, flops, hbm_bytes, layer_s, attn_s,
                             layer_s - attn_s)

    # --- expert offload: the host link and the host's CPUs ----------------------------------------
    @property
    def expert_bytes(self) -> float:
        """One routed expert's weights (every MoE layer's are the same size)."""
        return float(self.cfg.expert_params() * self.cfg.dtype_bytes)

    def expert_read_s(self) -> float:
        """Streaming one routed expert's weights from device memory (calibrated): what the device's FFN
        saves for each expert the host computes instead."""
        dev = self.hw.device
        return self.calibration.scale * self.expert_bytes / self.hw.count / (dev.mem_bandwidth * dev.bandwidth_efficiency)

    def expert_load_s(self) -> float:
        """Copying one routed expert host -> device over the host link (each device its share under TP)."""
        link = self.hw.host_link
        return link.latency_s + self.expert_bytes / self.hw.count / link.effective_bandwidth

    def host_expert_s(self, tokens: np.ndarray) -> np.ndarray:
        """Computing one routed expert on the host's CPUs for `tokens` [n] rows each -> [n] seconds: its
        weights streamed from host memory once, 2 FLOPs per multiply-add, a dispatch per expert."""
        host = self.hw.host
        flops = 2.0 * self.cfg.expert_params() * np.asarray(tokens, float)
        return host.expert_overhead_s + np.maximum(flops / (host.peak_flops * host.flop_efficiency),
                                                   self.expert_bytes / (host.mem_bandwidth * host.bandwidth_efficiency))


def idle_energy_j(hardware: Hardware, seconds: float) -> float:
    """Energy of the machine while no iteration runs (gaps between arrivals): static power only.
    Runs that report energy per token over wall time, as NVML measurements do, add this."""
    return hardware.device.static_w * hardware.count * seconds


def fit_calibration(cost_model: CostModel, samples: Iterable[tuple[IterationPlan, StepResult]],
                    fit_overhead: bool = True, source: str = "") -> Calibration:
    """Fit `scale` (and `kernel_overhead_s`) to measured iterations: (plan, the StepResult a real
    executor returned for it), whose elapsed_s is the wall time and layer_stats the experts its
    routers really chose. Minimises the squared *relative* error of the modelled time. Without
    fit_overhead the cost model's current overhead is kept. Raises when the samples cannot tell the
    two apart (plans of one shape only): measure plans of several sizes."""
    rows, measured = [], []
    for plan, result in samples:
        c = cost_model.price(plan, result.layer_stats)
        rows.append((c.roofline_s, c.kernels, c.comm_s))
        measured.append(result.elapsed_s)
    if not rows:
        raise ValueError("fit_calibration needs at least one (plan, StepResult) sample")
    roof, kernels, comm = np.array(rows).T
    y = np.array(measured)
    overhead = cost_model.calibration.kernel_overhead_s
    if fit_overhead:
        A = np.stack([roof, kernels], axis=1) / y[:, None]
        if np.linalg.matrix_rank(A, tol=1e-9 * np.abs(A).max()) < 2:
            raise ValueError("samples do not separate scale from kernel overhead (one plan shape?); "
                             "measure plans of several sizes or pass fit_overhead=False")
        (scale, overhead), *_ = np.linalg.lstsq(A, (y - comm) / y, rcond=None)
        if overhead < 0:  # the data prefer no overhead: refit the scale alone
            overhead = 0.0
    if not fit_overhead or overhead == 0.0:
        a, b = roof / y, (y - comm - overhead * kernels) / y
        scale = float(a @ b / (a @ a))
    modelled = scale * roof + comm + overhead * kernels
    rms = float(np.sqrt(np.mean(((modelled - y) / y) ** 2)))
    note = f"fit to {len(y)} iterations of {cost_model.cfg.name}, rms relative error {rms:.3f}"
    return Calibration(float(scale), float(overhead), f"{note}; {source}" if source else note)
