"""Host overhead per iteration: scheduling + plan building with 256 running requests, and pricing
one iteration in simulation.

    .venv/bin/python benchmarks/host_overhead.py        # writes benchmarks/host_overhead.json

No model runs: a stand-in executor answers instantly, so what is timed is the scheduler (policy,
KV block reservation) building the IterationPlan, and applying the step's result.
Goal: schedule + update < 1 ms.

Simulation: SimExecutor.execute (routing draws, traffic, cost model) on a Qwen3-30B-A3B iteration
with 256 decode rows and a 4,096-token prompt on h100x2, per routing model. Goal: well under 5 ms
(a simulated run prices thousands of iterations).
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from moejax.config import get_preset
from moejax.engine.kv_cache import KVCacheManager
from moejax.engine.plan import RowSlice, StepResult, plan_of
from moejax.engine.policies import make_policy
from moejax.engine.request import Request
from moejax.engine.sampling import SamplingParams
from moejax.engine.scheduler import Scheduler, SchedulerConfig
from moejax.sim.executor import SimExecutor

RUNNING, ITERS, BLOCK = 256, 2000, 16
SIM_PROMPT, SIM_ITERS = 4096, 50


def decode_ready_scheduler(policy: str) -> Scheduler:
    cfg = get_preset("qwen3-30b-a3b")
    sched = Scheduler(cfg, KVCacheManager(RUNNING * 256, BLOCK), make_policy(policy),
                      SchedulerConfig(max_num_seqs=RUNNING, token_budget=512, max_model_len=4096))
    rng = np.random.default_rng(0)
    for i in range(RUNNING):
        prompt = rng.integers(3, 1000, int(rng.integers(100, 1500))).tolist()
        sched.add(Request(i, prompt, SamplingParams(max_tokens=10_000, ignore_eos=True), seed=i))
    while any(r.num_uncomputed > 1 for r in sched.requests.values()):  # prefill everyone
        plan = sched.schedule()
        sched.update(plan, StepResult({s.request_id: 5 for s in plan.slices if s.sample}, 0.0, 0.0), 0.0)
    return sched


def sim_execute_ms() -> dict:
    """Host ms of SimExecutor.execute on one decode + prefill iteration, per routing model."""
    cfg = get_preset("qwen3-30b-a3b")
    L = cfg.num_layers
    slices = [RowSlice(i, 1000, (5,), 0, L, True, 1001) for i in range(RUNNING)]
    slices.append(RowSlice(RUNNING, 0, (3,) * SIM_PROMPT, 0, L, True, SIM_PROMPT))
    plan = plan_of(0, slices, L)
    out = {"decode_rows": RUNNING, "prompt_tokens": SIM_PROMPT, "iterations": SIM_ITERS}
    for routing in ("uniform", "correlated"):
        ex = SimExecutor(cfg, "h100x2", routing, seed=0)
        ex.execute(plan)
        times = []
        for _ in range(SIM_ITERS):
            t0 = time.perf_counter()
            ex.execute(plan)
            times.append(time.perf_counter() - t0)
        out[routing] = {"ms_median": 1e3 * float(np.median(times)), "ms_p99": 1e3 * float(np.percentile(times, 99))}
        print(f"sim {routing:10s} execute {out[routing]['ms_median']:.3f} ms (p99 {out[routing]['ms_p99']:.3f})")
    return out


def main() -> None:
    results = {"machine": f"{platform.machine()} CPU, {os.cpu_count()} cores",
               "load_average_1min": os.getloadavg()[0], "running_requests": RUNNING, "iterations": ITERS}
    for policy in ("chunked", "layered"):
        sched = decode_ready_scheduler(policy)
        t_sched, t_update = [], []
        for _ in range(ITERS):
            t0 = time.perf_counter()
            plan = sched.schedule()
            t1 = time.perf_counter()
            result = StepResult({s.request_id: 5 for s in plan.slices if s.sample}, 0.0, 0.0)
            t2 = time.perf_counter()
            sched.update(plan, result, 0.0)
            t3 = time.perf_counter()
            t_sched.append(t1 - t0)
            t_update.append(t3 - t2)
        assert len(plan.slices) == RUNNING and all(s.is_decode for s in plan.slices)
        ms = lambda xs, q=None: 1e3 * (float(np.mean(xs)) if q is None else float(np.percentile(xs, q)))  # noqa: E731
        results[policy] = {
            "schedule_ms_mean": ms(t_sched), "schedule_ms_p99": ms(t_sched, 99),
            "update_ms_mean": ms(t_update), "update_ms_p99": ms(t_update, 99),
            "schedule_plus_update_ms_mean": ms(np.add(t_sched, t_update)),
        }
        r = results[policy]
        print(f"{policy:8s} schedule {r['schedule_ms_mean']:.3f} ms (p99 {r['schedule_ms_p99']:.3f})  "
              f"update {r['update_ms_mean']:.3f} ms  total {r['schedule_plus_update_ms_mean']:.3f} ms")
    results["sim_execute_qwen3_30b_a3b_h100x2"] = sim_execute_ms()
    Path(__file__).with_suffix(".json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
