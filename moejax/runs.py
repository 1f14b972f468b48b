"""Serve a workload and report metrics — for real or in simulation, with the same call.

    run("tiny-qwen3-moe", policy="chunked", workload="sharegpt", rate=4)                 # real, local devices
    run("qwen3-30b-a3b", hardware="h100x2", policy="layered", workload="arxiv", rate=1.3)  # simulated
    compare(["chunked", "layered"], "qwen3-30b-a3b", hardware="h100x2", workload="arxiv")
    run("stdlib-moe", offload={"device_expert_slots": 8, "predictor": "learned"})          # experts in host memory

Both build the same engine (moejax.engine.build: scheduler + policy) and differ only in the executor:
"jax" on a wall clock, or "sim" on a virtual one ("offload" / "sim-offload" with `offload=`). The
result is the stable JSON of moejax.engine.metrics; offload runs add their offload_* metrics and an
"offload" object (per-layer counters, settings).

Policies are named `name[@token_budget]`: "chunked@256" is chunked prefill with 256-token chunks.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from moejax.config import get_preset
from moejax.engine.compiles import count_compilations
from moejax.engine.engine import Arrival
from moejax.engine.factory import build
from moejax.engine.metrics import SLO
from moejax.engine.policies import parse_policy
from moejax.engine.sampling import SamplingParams
from moejax.sim.cost_model import Calibration, idle_energy_j
from moejax.sim.workloads import WorkloadRequest, make_workload, prompt_token_ids


def run(model: str, *, hardware: str | None = None, policy: str = "chunked", workload: str = "sharegpt",
        rate: float = 1.0, num_requests: int = 100, seed: int = 0, slo: SLO = SLO(),
        max_model_len: int | None = None, token_budget: int = 512, max_num_seqs: int = 256,
        routing: str = "correlated", routing_params: dict | None = None, layout: str | None = None,
        progress: bool = False, dtype: str | None = None, details: bool = False, warmup: bool = True,
        calibration: Calibration | None = None, offload: dict | None = None,
        **policy_options) -> dict:
    """Serve `num_requests` of `workload` arriving at `rate` req/s; returns settings + "metrics"
    (+ per-request "requests" and per-iteration "iterations" records when `details`).

    hardware=None runs the real model (preset or checkpoint) on the local devices (`layout` places it);
    a hardware name (moejax.sim.hardware) simulates the preset on that machine. Real runs measure steady
    state: with `warmup`, the workload is first served once, untimed (compiling the shapes it needs),
    and a fresh engine on the same model serves it again, timed; compilations left in the timed run
    are reported as metrics["num_compilations"].

    offload: expert offload options (moejax.offload: offload_experts or device_expert_slots,
    predictor, load_rule, host_compute, ...; simulated also host_link, predictor_recall)."""
    token_budget = parse_policy(policy)[1].get("token_budget", token_budget)
    options = dict(policy=policy, token_budget=token_budget, max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                   seed=seed, **policy_options)
    if hardware is None:
        from moejax.checkpoint import load_model

        m, _ = load_model(model, seed=seed, layout=layout, dtype=dtype)
        cfg = m.config
        executor = "jax"
        if offload is not None:  # both engines share the model (and its compilations): its experts stay put
            from moejax.offload.executor import executor_options
            executor, options = "offload", {**options, **executor_options(offload, model)}

        def make_engine():
            return build(m, executor, **options)
        engine = make_engine()
        where = f"{jax.devices()[0].platform}x{jax.device_count()}" + (f" ({layout})" if layout else "")
    else:
        cfg = get_preset(model)
        if policy.startswith("layered-adaptive"):
            options.setdefault("tbt_target_s", slo.tbt_s)
        engine = build(cfg, "sim" if offload is None else "sim-offload", hardware=hardware, routing=routing,
                       routing_params=routing_params, calibration=calibration, **options, **(offload or {}))
        where = hardware
    max_model_len = engine.scheduler.config.max_model_len
    requests = make_workload(workload, rate, num_requests, seed=seed, max_model_len=max_model_len)
    prompts = prompt_token_ids(requests, cfg.vocab_size, seed=seed, exclude=cfg.eos_token_ids)
    arrivals = [Arrival(r.arrival_s, p, SamplingParams(max_tokens=r.output_len, ignore_eos=True))
                for r, p in zip(requests, prompts)]
    if hardware is None and warmup:  # the same arrivals once, untimed: compiles the shapes they need
        engine.run(arrivals, progress="warm-up (untimed, compiling)" if progress else False)
        engine = make_engine()
    with count_compilations() as compiled:
        served = engine.run(arrivals, progress="timed run" if progress else False)
    metrics = engine.metrics(served, slo)
    if hardware is None:
        metrics["num_compilations"] = compiled.count
    else:  # energy over wall time, as NVML measures it: the machine idles between iterations too
        busy = sum(s.elapsed_s for s in engine.steps)
        idle_j = idle_energy_j(engine.executor.hardware, max(0.0, metrics["duration_s"] - busy))
        metrics["energy_total_j"] += idle_j
        served_tokens = sum(r.num_tokens for r in served)
        metrics["energy_per_token_j"] = metrics["energy_total_j"] / served_tokens
    if offload is not None:
        metrics.update(engine.executor.residency.stats.metrics())
    result = {
        "model": cfg.name, "hardware": where, "simulated": hardware is not None, "policy": policy,
        "workload": workload, "rate": rate, "num_requests": num_requests, "seed": seed,
        "routing": routing if hardware is not None and cfg.num_experts else None,
        "routing_params": routing_params if hardware is not None and cfg.num_experts else None,
        "token_budget": token_budget, "max_model_len": max_model_len,
        "slo": {"ttft_s": slo.ttft_s, "tbt_s": slo.tbt_s}, "policy_options": policy_options,
        "metrics": metrics,
    }
    if offload is not None:
        result["offload"] = engine.executor.offload_summary()
    if details:
        result["requests"] = [
            {"prompt_len": r.num_prompt_tokens, "output_len": r.num_output_tokens, "arrival_s": r.arrival_time,
             "ttft_s": r.first_token_time - r.arrival_time, "e2e_s": r.finish_time - r.arrival_time,
             "tbt_s": np.diff(r.token_times).tolist(), "preemptions": r.num_preemptions} for r in served]
        result["iterations"] = [dataclasses.asdict(s) for s in engine.steps]
    return result


def compare(policies: list[str], model: str, **kwargs) -> dict:
    """run() once per policy with the same workload and settings -> {"runs": {policy: result}}."""
    return {"runs": {p: run(model, policy=p, **kwargs) for p in policies}}


def max_rate_within_slo(model: str, *, target: float = 0.9, rates: list[float], **kwargs) -> dict:
    """The highest of `rates` whose SLO attainment is >= target, and every run's metrics."""
    results = {r: run(model, rate=r, **kwargs) for r in rates}
    ok = [r for r, res in results.items() if (res["metrics"]["slo_attainment"] or 0) >= target]
    return {"max_rate": max(ok) if ok else None, "target": target, "runs": results}


def prompt_expert_bytes(model: str, prompt_len: int, policy: str, *, hardware: str | None = None,
                        routing: str = "correlated", seed: int = 0, **policy_options) -> float:
    """Routed-expert bytes read to prefill one prompt of `prompt_len` tokens alone (no other requests),
    for real (exact counts from the executor) or simulated on `hardware`."""
    options = dict(policy=policy, max_model_len=prompt_len + 8, seed=seed, **policy_options)
    if hardware is None:
        engine = build(model, "jax", **options)
    else:
        engine = build(model, "sim", hardware=hardware, routing=routing, **options)
    vocab = engine.config.vocab_size
    prompt = prompt_token_ids([WorkloadRequest(0.0, prompt_len, 1)], vocab, seed=seed)[0]
    engine.run([Arrival(0.0, prompt, SamplingParams(max_tokens=1, ignore_eos=True))])
    return float(sum(s.expert_bytes for s in engine.steps))
