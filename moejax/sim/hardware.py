"""Hardware specs for the simulator: accelerators, links, and machines (device × count × interconnect).

Peak numbers are the vendors' datasheet figures; bandwidths are *per direction* (datasheets quote
NVLink and PCIe bidirectional totals, which we halve). Efficiencies and energy constants are
estimates, documented where they are defined; `cost_model` scales time by a calibrated constant.

Datasheets:
  [H100]  NVIDIA H100 Tensor Core GPU datasheet (SXM5): BF16 1,979 TFLOPS with 2:4 sparsity
          (989.4 dense), 80 GB HBM3 at 3.35 TB/s, NVLink 900 GB/s, PCIe Gen5 128 GB/s, up to 700 W.
  [H200]  NVIDIA H200 Tensor Core GPU datasheet (SXM): BF16 1,979 TFLOPS sparse (989 dense),
          141 GB HBM3e at 4.8 TB/s, NVLink 900 GB/s, PCIe Gen5 128 GB/s, up to 700 W.
  [A100]  NVIDIA A100 Tensor Core GPU datasheet (80GB SXM): BF16 312 TFLOPS dense (624 sparse),
          80 GB HBM2e at 2,039 GB/s, NVLink 600 GB/s, PCIe Gen4 64 GB/s, 400 W.
  [L40S]  NVIDIA L40S datasheet: BF16 tensor 362.05 TFLOPS dense (733 sparse), 48 GB GDDR6 at
          864 GB/s, PCIe Gen4 x16 64 GB/s, no NVLink, 350 W.
  [H20]   NVIDIA H20 (China-market Hopper; no public datasheet page, figures as NVIDIA's product brief is
          widely reported): BF16 148 TFLOPS dense, 96 GB HBM3 at 4.0 TB/s, NVLink 900 GB/s, PCIe Gen5, 400 W.
  [100GbE] IEEE 802.3 100 Gb/s Ethernet: 12.5 GB/s per direction; the inter-cluster link of PrfaaS
          (arXiv 2604.15039), which ships KV over several TCP connections.
  [PCIe]  PCI-SIG base specs: x16 per direction, 128b/130b coding: Gen3 8 GT/s -> 15.75 GB/s,
          Gen4 16 GT/s -> 31.5 GB/s, Gen5 32 GT/s -> 63.0 GB/s.
  [C2C]   NVIDIA Grace Hopper (GH200) NVLink-C2C: 900 GB/s total, 450 GB/s per direction.
  [ICX]   Intel Xeon Platinum 8380 (Ice Lake-SP): 40 cores, 2.3 GHz base, two AVX-512 FMA units per core
          (32 fp32 FLOP/cycle), 8 channels of DDR4-3200 (204.8 GB/s) per socket.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

GB = 1e9
TFLOPS = 1e12

# Achieved fraction of link bandwidth: NCCL all-reduce bus bandwidth on NVLink and host-device copy
# rates over PCIe both land near 80% of nominal (e.g. ~25 GB/s of Gen4's 31.5; ~13 GB/s of Gen3's
# 15.75, the figure LayerScope's per-expert load times imply).
LINK_EFFICIENCY = 0.8
# cuBLAS bf16 GEMMs at large sizes sustain ~65-75% of dense tensor peak on Hopper/Ampere.
FLOP_EFFICIENCY = 0.7
# Streaming kernels reach ~85-90% of HBM peak; GEMV/grouped-GEMM weight reads somewhat less.
BANDWIDTH_EFFICIENCY = 0.8


@dataclass(frozen=True)
class Link:
    name: str
    bandwidth: float  # bytes/s, per direction
    latency_s: float  # one small-message transfer / all-reduce, including launch
    efficiency: float = LINK_EFFICIENCY

    @property
    def effective_bandwidth(self) -> float:
        return self.bandwidth * self.efficiency


# Latencies are estimates: a one-shot NVLink all-reduce (vLLM's custom all-reduce) takes a few µs;
# a PCIe transfer or NCCL step through the host bridge ~10 µs.
LINKS: dict[str, Link] = {
    "pcie3": Link("pcie3", 15.75 * GB, 10e-6),  # [PCIe]
    "pcie4": Link("pcie4", 31.5 * GB, 10e-6),  # [PCIe]
    "pcie5": Link("pcie5", 63.0 * GB, 10e-6),  # [PCIe]
    "nvlink3": Link("nvlink3", 300 * GB, 5e-6),  # [A100] 600 GB/s bidirectional
    "nvlink4": Link("nvlink4", 450 * GB, 5e-6),  # [H100]/[H200] 900 GB/s bidirectional
    "nvlink-c2c": Link("nvlink-c2c", 450 * GB, 5e-6),  # [C2C] Grace host <-> Hopper
    # Between clusters (even datacenters): ~1 ms one way is an estimate for a metro-distance path; TCP
    # over several connections keeps ~90% of the line rate busy (estimate).
    "eth-100g": Link("eth-100g", 12.5 * GB, 1e-3, efficiency=0.9),  # [100GbE]
}


# Host CPUs computing experts (expert offload, Fiddler / LayerScope's CPU path) reach a fraction of
# their peaks: bf16 weights are widened to fp32 on AVX-512 machines without AMX, and a per-expert
# GEMM on a few tokens streams its weights once (memory-bound). Estimates: ~half the DRAM bandwidth
# (STREAM reaches ~70% on two sockets; expert kernels less), ~30% of fp32 FMA peak, and a thread-pool
# dispatch per expert.
HOST_BANDWIDTH_EFFICIENCY = 0.5
HOST_FLOP_EFFICIENCY = 0.3
HOST_EXPERT_OVERHEAD_S = 50e-6


@dataclass(frozen=True)
class HostSpec:
    """The CPUs beside the accelerators (host memory holds offloaded experts; they can compute them)."""

    name: str
    peak_flops: float  # fp32 FLOP/s, all sockets
    mem_bandwidth: float  # bytes/s, all sockets
    flop_efficiency: float = HOST_FLOP_EFFICIENCY
    bandwidth_efficiency: float = HOST_BANDWIDTH_EFFICIENCY
    expert_overhead_s: float = HOST_EXPERT_OVERHEAD_S


HOSTS: dict[str, HostSpec] = {
    h.name: h for h in (
        HostSpec("xeon-8380x2", 2 * 40 * 2.3e9 * 32, 2 * 204.8 * GB),  # [ICX], two sockets
    )
}
DEFAULT_HOST = HOSTS["xeon-8380x2"]


@dataclass(frozen=True)
class DeviceSpec:
    """One accelerator. Energy: E = pj_per_flop·FLOPs + pj_per_byte·bytes + static_w·time."""

    name: str
    peak_flops: float  # dense bf16 tensor FLOP/s
    mem_bandwidth: float  # bytes/s
    memory_bytes: float
    device_link: str | None  # NVLink generation (key of LINKS); None: peers talk over PCIe
    host_link: str  # key of LINKS
    tdp_w: float
    static_w: float  # drawn while running whatever the work (leakage, clocks, fixed activity)
    pj_per_byte: float  # effective energy per byte of device-memory traffic
    flop_efficiency: float = FLOP_EFFICIENCY
    bandwidth_efficiency: float = BANDWIDTH_EFFICIENCY

    @property
    def pj_per_flop(self) -> float:
        """A large bf16 GEMM runs at the power cap while sustaining flop_efficiency × peak, so the
        dynamic energy per FLOP is (TDP − static) / (efficiency · peak). H100: (700−105 W) /
        (0.7 · 989 TF) ≈ 0.86 pJ; A100 ≈ 1.6 pJ; L40S ≈ 1.2 pJ."""
        return (self.tdp_w - self.static_w) / (self.flop_efficiency * self.peak_flops) * 1e12


# Energy per byte: DRAM access energy is ~3.9 pJ/bit for HBM2 (O'Connor et al., "Fine-Grained DRAM",
# MICRO 2017; HBM3 is in the same range) and ~7.5 pJ/bit for GDDR6 (vendor figures). Moving the
# byte on chip through L2, crossbar and shared memory to the SMs costs about as much again
# (Dally et al., "Evolution of the Graphics Processing Unit", IEEE Micro 2021: off-chip access and
# on-chip transport are the same order). So effective ≈ 2 × DRAM: 8 pJ/bit = 64 pJ/B for HBM,
# 15 pJ/bit = 120 pJ/B for GDDR6. Sanity: an H100 streaming weights at 0.8 × 3.35 TB/s draws
# 64 pJ/B × 2.7 TB/s + 105 W static ≈ 275 W.
HBM_PJ_PER_BYTE = 64.0
GDDR6_PJ_PER_BYTE = 120.0
# Static power ≈ 15% of TDP: SXM H100s idle at ~70-110 W with clocks up (nvidia-smi), A100s ~55 W.
STATIC_FRACTION = 0.15

DEVICES: dict[str, DeviceSpec] = {
    d.name: d for d in (
        DeviceSpec("h100-sxm", 989.4 * TFLOPS, 3350 * GB, 80 * GB, "nvlink4", "pcie5",  # [H100]
                   tdp_w=700, static_w=STATIC_FRACTION * 700, pj_per_byte=HBM_PJ_PER_BYTE),
        DeviceSpec("h200-sxm", 989.4 * TFLOPS, 4800 * GB, 141 * GB, "nvlink4", "pcie5",  # [H200]
                   tdp_w=700, static_w=STATIC_FRACTION * 700, pj_per_byte=HBM_PJ_PER_BYTE),
        DeviceSpec("h20", 148 * TFLOPS, 4000 * GB, 96 * GB, "nvlink4", "pcie5",  # [H20]
                   tdp_w=400, static_w=STATIC_FRACTION * 400, pj_per_byte=HBM_PJ_PER_BYTE),
        DeviceSpec("a100-sxm-80gb", 312 * TFLOPS, 2039 * GB, 80 * GB, "nvlink3", "pcie4",  # [A100]
                   tdp_w=400, static_w=STATIC_FRACTION * 400, pj_per_byte=HBM_PJ_PER_BYTE),
        DeviceSpec("l40s", 362.05 * TFLOPS, 864 * GB, 48 * GB, None, "pcie4",  # [L40S]
                   tdp_w=350, static_w=STATIC_FRACTION * 350, pj_per_byte=GDDR6_PJ_PER_BYTE),
    )
}


@dataclass(frozen=True)
class Hardware:
    """`count` identical devices running the model tensor-parallel over `interconnect`; each device
    reaches host memory over `host_link` (expert offload streams weights over it), on a `host`."""

    name: str
    device: DeviceSpec
    count: int
    interconnect: Link
    host_link: Link
    host: HostSpec = DEFAULT_HOST

    @property
    def memory_bytes(self) -> float:
        return self.device.memory_bytes * self.count

    def with_host_link(self, link: str) -> "Hardware":
        """The same machine on another host link, e.g. `get_hardware("a100").with_host_link("pcie3")`
        for LayerScope-style legacy servers."""
        return dataclasses.replace(self, name=f"{self.name}+{link}", host_link=get_link(link))


def get_link(name: str) -> Link:
    try:
        return LINKS[name]
    except KeyError:
        raise ValueError(f"unknown link {name!r}; links: {', '.join(LINKS)}") from None


def _machine(name: str, device: str, count: int) -> Hardware:
    spec = DEVICES[device]
    peer = spec.device_link or spec.host_link  # without NVLink, peers talk over PCIe
    return Hardware(name, spec, count, LINKS[peer], LINKS[spec.host_link])


HARDWARE: dict[str, Hardware] = {
    hw.name: hw for hw in (
        _machine("h100", "h100-sxm", 1), _machine("h100x2", "h100-sxm", 2),
        _machine("h100x4", "h100-sxm", 4), _machine("h100x8", "h100-sxm", 8),
        _machine("h200", "h200-sxm", 1), _machine("h200x2", "h200-sxm", 2),
        _machine("h200x8", "h200-sxm", 8), _machine("h20x8", "h20", 8),
        _machine("a100", "a100-sxm-80gb", 1), _machine("a100x2", "a100-sxm-80gb", 2),
        _machine("a100x4", "a100-sxm-80gb", 4), _machine("a100x8", "a100-sxm-80gb", 8),
        _machine("l40s", "l40s", 1), _machine("l40sx2", "l40s", 2), _machine("l40sx4", "l40s", 4),
    )
}


def get_hardware(name: str) -> Hardware:
    try:
        return HARDWARE[name]
    except KeyError:
        raise ValueError(f"unknown hardware {name!r}; presets: {', '.join(HARDWARE)}") from None
