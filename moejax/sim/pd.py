"""A PrfaaS deployment in simulation (arXiv 2604.15039): a PrfaaS prefill cluster, a local PD cluster, one link.

    requests ─ t? ─▶ long:  PrfaaS prefill instance ──KV over the link──▶ local decode instance
                    short: local prefill instance ─────────────────────▶ local decode instance

Costs come from the cost model (`moejax.sim.cost_model` through `ExpectedPricer`, uniform routing):
a prompt's prefill on one instance (one whole-prompt slice; `prefill_seconds`), a decode step of a batch
(`decode_plan` picks the largest batch within the TBT target and the instance's KV memory). `profile`
turns a workload sample into the throughput model's `RequestProfile`; `simulate` serves a request
stream event by event:

    prefill     FCFS on the pool's first free instance, one request at a time
    transfer    offloaded KV streams layer by layer while its prefill runs: the link is a FIFO of bytes
                at its effective bandwidth, and a transfer ends no earlier than its prefill's end plus
                the last layer's share; `latency_s` later the KV is on the decode side. Local hand-offs
                stay inside the cluster (RDMA): not priced
    decode      `batch` slots per decode instance, a request holds one for output_len steps

TTFT is arrival → KV on the decode side (the first token is sampled at the prefill's end and travels
with it). Metrics per request (route, KV bytes shipped, transfer time) and for the run (throughput,
TTFT mean / P90, egress, link utilisation).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field, replace
from functools import cache

import numpy as np

from moejax.engine.plan import RowSlice, plan_of
from moejax.pd.throughput_model import Capacity, RequestProfile
from moejax.sim.hardware import Hardware, Link
from moejax.sim.pd_models import PdModel
from moejax.sim.pricing import ExpectedPricer
from moejax.sim.workloads import WorkloadRequest

KV_MEMORY_FRACTION = 0.9  # of device memory left after the weights, for KV (activations, fragmentation)
_PREFILL_GRID = np.unique(np.geomspace(1, 262144, 64).round().astype(np.int64))  # lengths priced exactly


@cache
def _pricers(model: PdModel, hardware: Hardware) -> tuple[ExpectedPricer, ...]:
    return tuple(ExpectedPricer(p.config, hardware, None) for p in model.parts)


def _price(model: PdModel, hardware: Hardware, slices: list[RowSlice]) -> float:
    """Seconds of one iteration of `slices` (each passing every layer) over all the model's parts."""
    total = 0.0
    for pr in _pricers(model, hardware):
        L = pr.cfg.num_layers
        total += pr(plan_of(0, [s._replace(layer_end=L) for s in slices], L))
    return total


@cache
def _prefill_curve(model: PdModel, hardware: Hardware) -> np.ndarray:
    return np.array([_price(model, hardware, [RowSlice(0, 0, (0,) * int(n), 0, 0, True, int(n))])
                     for n in _PREFILL_GRID])


def prefill_seconds(model: PdModel, hardware: Hardware, prompt_len) -> np.ndarray:
    """Seconds to prefill prompts of `prompt_len` tokens ([n]) on one instance, one prompt at a time:
    the cost model at ~60 lengths (1 .. 256K, geometric), linear in between."""
    n = np.asarray(prompt_len, float)
    if np.any(n < 1) or np.any(n > _PREFILL_GRID[-1]):
        raise ValueError(f"prompt lengths must be in [1, {_PREFILL_GRID[-1]}], got {n.min():.0f} .. {n.max():.0f}")
    return np.interp(n, _PREFILL_GRID, _prefill_curve(model, hardware))


def decode_step_seconds(model: PdModel, hardware: Hardware, batch: int, context: int) -> float:
    """One decode step of `batch` requests each at `context` tokens, on one instance."""
    return _price(model, hardware, [RowSlice(i, context, (0,), 0, 0, True, context + 1) for i in range(batch)])


@dataclass(frozen=True)
class DecodePlan:
    batch: int  # requests decoding together on one instance
    step_s: float  # one decode step at that batch
    rps: float  # requests/s one instance completes: batch / (output_len · step_s)
    bound: str  # what stops a larger batch: "tbt", "kv_memory" or "max_batch"


def decode_plan(model: PdModel, hardware: Hardware, context: int, output_len: int, tbt_target_s: float,
                max_batch: int = 512) -> DecodePlan:
    """The largest decode batch whose step fits `tbt_target_s` and whose KV (each request at
    `context` + output_len tokens) fits the instance's memory after the weights."""
    free = hardware.memory_bytes * KV_MEMORY_FRACTION - model.weight_bytes()
    if free <= 0:
        raise ValueError(f"{model.name}'s weights ({model.weight_bytes() / 1e9:.0f} GB) do not fit "
                         f"{hardware.name} ({hardware.memory_bytes / 1e9:.0f} GB)")
    by_memory = int(free // model.kv_bytes(context + output_len))
    limit, bound = (by_memory, "kv_memory") if by_memory < max_batch else (max_batch, "max_batch")
    if limit < 1 or decode_step_seconds(model, hardware, 1, context) > tbt_target_s:
        raise ValueError(f"{model.name} on {hardware.name}: not one request decodes at {context} tokens within "
                         f"tbt_target_s={tbt_target_s} and {free / 1e9:.0f} GB of KV memory")
    lo, hi = 1, limit  # the step time grows with the batch: bisect for the last batch within the target
    if decode_step_seconds(model, hardware, hi, context) > tbt_target_s:
        bound = "tbt"
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if decode_step_seconds(model, hardware, mid, context) <= tbt_target_s else (lo, mid)
    else:
        lo = hi
    step = decode_step_seconds(model, hardware, lo, context)
    return DecodePlan(lo, step, lo / (output_len * step), bound)


@dataclass(frozen=True)
class Deployment:
    """A PrfaaS cluster and a local PD cluster of whole instances (tensor-parallel over each machine)."""

    model: PdModel
    prfaas: Hardware  # one PrfaaS prefill instance, e.g. h200x8
    prfaas_instances: int
    local: Hardware  # one local instance, prefill or decode, e.g. h20x8
    local_instances: int
    link: Link  # PrfaaS -> local cluster
    tbt_target_s: float = 0.05
    max_batch: int = 512

    def __post_init__(self):
        if self.prfaas_instances < 0:
            raise ValueError(f"Deployment.prfaas_instances must be >= 0, got {self.prfaas_instances}")
        if self.local_instances < 1:
            raise ValueError(f"Deployment.local_instances must be >= 1 (decode runs locally), got {self.local_instances}")
        if not self.tbt_target_s > 0 or self.max_batch < 1:
            raise ValueError(f"Deployment: tbt_target_s must be positive and max_batch >= 1, got "
                             f"{self.tbt_target_s} and {self.max_batch}")

    @property
    def link_bytes_per_s(self) -> float:
        return self.link.effective_bandwidth

    def with_link_gbps(self, gbps: float) -> "Deployment":
        """The same deployment over a link of `gbps` line rate (same latency and efficiency)."""
        if not gbps > 0:
            raise ValueError(f"link bandwidth must be positive (Gbps), got {gbps}")
        return replace(self, link=replace(self.link, name=f"{self.link.name}@{gbps:g}Gbps", bandwidth=gbps * 1e9 / 8))


def _decode_plan(dep: Deployment, requests: list[WorkloadRequest]) -> DecodePlan:
    """The decode plan at the requests' mean prompt and output lengths."""
    prompt = int(round(np.mean([r.prompt_len for r in requests])))
    output = int(round(np.mean([r.output_len for r in requests])))
    return decode_plan(dep.model, dep.local, prompt, output, dep.tbt_target_s, dep.max_batch)


def profile(dep: Deployment, requests: list[WorkloadRequest]) -> tuple[RequestProfile, DecodePlan]:
    """The throughput model's view of `requests` on `dep`, and the decode plan it assumes."""
    lengths = np.array([r.prompt_len for r in requests])
    decode = _decode_plan(dep, requests)
    return RequestProfile(lengths, prefill_seconds(dep.model, dep.prfaas, lengths),
                          prefill_seconds(dep.model, dep.local, lengths),
                          dep.model.kv_bytes(lengths).astype(float), decode.rps), decode


@dataclass
class RequestTimeline:
    arrival_s: float
    prompt_len: int
    route: str  # "prfaas" or "local"
    prefill_start_s: float
    prefill_end_s: float
    kv_bytes: int  # bytes shipped over the link (0 for local requests)
    transfer_s: float  # link busy time of its KV (0 for local)
    kv_ready_s: float  # KV (and the first token) on the decode side
    decode_start_s: float = math.nan
    finish_s: float = math.nan

    @property
    def ttft_s(self) -> float:
        return self.kv_ready_s - self.arrival_s


@dataclass
class SimResult:
    requests: list[RequestTimeline]
    link_bytes_per_s: float
    metrics: dict = field(default_factory=dict)


def _pool(n: int) -> list[float]:
    return [0.0] * n  # a heap of the times each server frees


def simulate(dep: Deployment, requests: list[WorkloadRequest], *, threshold: float, prefill_instances: int,
             decode_instances: int, decode: DecodePlan | None = None) -> SimResult:
    """Serve `requests` (arrival order) on `dep`, offloading prompts of >= threshold tokens."""
    if prefill_instances + decode_instances > dep.local_instances or decode_instances < 1:
        raise ValueError(f"prefill_instances={prefill_instances} + decode_instances={decode_instances} must fit "
                         f"local_instances={dep.local_instances} with at least one decode instance")
    reqs = sorted(requests, key=lambda r: r.arrival_s)
    lengths = np.array([r.prompt_len for r in reqs])
    offload = lengths >= threshold
    if offload.any() and dep.prfaas_instances < 1:
        raise ValueError(f"threshold={threshold} offloads {offload.sum()} requests but the deployment has no PrfaaS instance")
    if (~offload).any() and prefill_instances < 1:
        raise ValueError(f"threshold={threshold} keeps {(~offload).sum()} requests local but prefill_instances=0")
    decode = decode or _decode_plan(dep, reqs)
    prfaas_s = prefill_seconds(dep.model, dep.prfaas, lengths)
    local_s = prefill_seconds(dep.model, dep.local, lengths)
    kv = dep.model.kv_bytes(lengths)
    layers, bw, latency = dep.model.num_layers, dep.link.effective_bandwidth, dep.link.latency_s
    pools = {True: _pool(dep.prfaas_instances), False: _pool(prefill_instances)}
    link_free = 0.0
    out = []
    for r, off, tp, tl, b in zip(reqs, offload, prfaas_s, local_s, kv):
        pool = pools[bool(off)]
        start = max(r.arrival_s, heapq.heappop(pool))
        end = start + (tp if off else tl)
        heapq.heappush(pool, end)
        if off:
            busy = b / bw
            tx_start = max(start, link_free)  # the first layer's KV leaves as soon as it is computed
            link_free = tx_start + busy
            ready = max(link_free, end + busy / layers) + latency
            out.append(RequestTimeline(r.arrival_s, r.prompt_len, "prfaas", start, end, int(b), busy, ready))
        else:
            out.append(RequestTimeline(r.arrival_s, r.prompt_len, "local", start, end, 0, 0.0, end))
    slots = _pool(decode_instances * decode.batch)
    for t, r in sorted(zip(out, reqs), key=lambda x: x[0].kv_ready_s):
        t.decode_start_s = max(t.kv_ready_s, heapq.heappop(slots))
        t.finish_s = t.decode_start_s + r.output_len * decode.step_s
        heapq.heappush(slots, t.finish_s)
    result = SimResult(out, bw)
    result.metrics = summarise(result)
    return result


def summarise(result: SimResult) -> dict:
    """Run metrics: completion rate over the middle 80% of completions (no warm-up or drain), TTFT
    mean / P50 / P90, offload share, egress (bytes and Gbps over the run), link utilisation."""
    reqs = result.requests
    ttft = np.array([r.ttft_s for r in reqs])
    finish = np.sort([r.finish_s for r in reqs])
    n = len(reqs)
    lo, hi = int(0.1 * n), max(int(0.9 * n) - 1, 0)
    throughput = (hi - lo) / (finish[hi] - finish[lo]) if hi > lo and finish[hi] > finish[lo] else math.nan
    first = min(r.arrival_s for r in reqs)
    span = finish[-1] - first
    shipped = sum(r.kv_bytes for r in reqs)
    busy = sum(r.transfer_s for r in reqs)
    wait = np.array([r.decode_start_s - r.kv_ready_s for r in reqs])
    return {"requests": n, "throughput_rps": float(throughput),
            "ttft_mean_s": float(ttft.mean()), "ttft_p50_s": float(np.percentile(ttft, 50)),
            "ttft_p90_s": float(np.percentile(ttft, 90)),
            "offload_share": sum(r.route == "prfaas" for r in reqs) / n,
            "kv_bytes_shipped": int(shipped), "egress_gbps": 8 * shipped / span / 1e9,
            "link_utilisation": busy / span, "decode_wait_mean_s": float(wait.mean()), "makespan_s": float(span)}


def per_request(result: SimResult) -> list[dict]:
    """Per-request rows for a metrics JSON."""
    return [{"arrival_s": r.arrival_s, "prompt_len": r.prompt_len, "route": r.route,
             "prefill_s": r.prefill_end_s - r.prefill_start_s, "kv_bytes": r.kv_bytes,
             "transfer_s": r.transfer_s, "ttft_s": r.ttft_s, "finish_s": r.finish_s} for r in result.requests]


def capacity_summary(c: Capacity, profile_: RequestProfile) -> dict:
    """A Capacity as JSON: Λ, the threshold, the split, the binding term, egress at Λ."""
    return {"throughput_rps": c.throughput, "threshold": None if math.isinf(c.threshold) else c.threshold, "offload_share": c.offload_share,
            "prefill_instances": c.prefill_instances, "decode_instances": c.decode_instances, "bound": c.bound,
            "terms_rps": {k: None if math.isinf(getattr(c, k)) else getattr(c, k) for k in ("prfaas_compute", "link", "pd_prefill", "pd_decode")},
            "egress_gbps_at_capacity": 8 * c.egress_bytes_per_s(profile_) / 1e9}


def run_deployment(dep: Deployment, *, workload: str = "longctx", num_requests: int = 2000, rate: float | None = None,
                   load: float = 0.85, seed: int = 0, threshold: float | None = None,
                   prefill_instances: int | None = None, requests: bool = False) -> dict:
    """Plan and serve one deployment: the throughput model on a workload sample (seed) picks t and the
    split (`choose_split`; `threshold` / `prefill_instances` fix them instead), then a fresh stream of the
    workload (seed + 1) at `rate` req/s (default: `load` × the planned Λ) is simulated. JSON-ready:
    the plan (Λ, its terms, t, split, egress at Λ), the decode plan, run metrics, and with `requests`
    the per-request timeline."""
    from moejax.pd.throughput_model import capacity, choose_split, choose_threshold
    from moejax.sim.workloads import make_workload

    sample = make_workload(workload, 1.0, num_requests, seed=seed)
    prof, decode = profile(dep, sample)
    link = dep.link_bytes_per_s
    if prefill_instances is not None and not 0 <= prefill_instances < dep.local_instances:
        raise ValueError(f"prefill_instances must be in [0, local_instances={dep.local_instances}), got {prefill_instances}")
    if threshold is not None and prefill_instances is None:
        raise ValueError("a fixed threshold needs prefill_instances too (the split is chosen for a threshold)")
    split = dict(prfaas_instances=dep.prfaas_instances, link_bytes_per_s=link)
    if prefill_instances is None:
        plan = choose_split(prof, local_instances=dep.local_instances, **split)
    elif threshold is None:
        plan = choose_threshold(prof, prefill_instances=prefill_instances,
                                decode_instances=dep.local_instances - prefill_instances, **split)
    else:
        plan = capacity(prof, threshold, prefill_instances=prefill_instances,
                        decode_instances=dep.local_instances - prefill_instances, **split)
    rate = load * plan.throughput if rate is None else rate
    stream = make_workload(workload, rate, num_requests, seed=seed + 1)
    sim = simulate(dep, stream, threshold=plan.threshold, prefill_instances=plan.prefill_instances,
                   decode_instances=plan.decode_instances, decode=decode)
    out = {"model": dep.model.name, "prfaas": f"{dep.prfaas_instances} x {dep.prfaas.name}",
           "local": f"{dep.local_instances} x {dep.local.name}", "link": dep.link.name,
           "link_gbps": 8 * dep.link.bandwidth / 1e9, "workload": workload, "rate_rps": rate,
           "plan": capacity_summary(plan, prof),
           "decode": {"batch": decode.batch, "step_s": decode.step_s, "rps_per_instance": decode.rps,
                      "bound": decode.bound},
           "metrics": sim.metrics}
    if requests:
        out["requests"] = per_request(sim)
    return out
