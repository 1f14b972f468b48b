"""Expert offload for real on this machine's CPU: stdlib-moe's experts in host memory (the CPU
backend's pinned_host memory kind), a device cache of 8 of 32 experts per layer, the copies real.

    .venv/bin/python benchmarks/offload_cpu.py      # ~9 min on 2 shared cores

One invocation, the same requests for every configuration (held-out text, the model never saw it):

1. stall with prefetch vs on demand: 8 prompts of 64 tokens, 32 output tokens each, decoded as one
   batch; predictors none / lfru / gate-ahead / learned (presched load rule).
2. layered vs chunked prefill on offload: 4 prompts of 512 tokens, 4 output tokens; chunked@128 vs
   layered (the paper's group table: one cohort of 2048 tokens crosses the layers in 4 groups).

Each configuration is served once to compile, then timed on a fresh engine (cold cache) over the same
model. Also: the host -> device copy rate of one expert (what a load costs here). Writes
benchmarks/offload_cpu.json.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import jax
import numpy as np

from moejax.checkpoint import load_model
from moejax.engine import build
from moejax.engine.engine import Arrival
from moejax.engine.sampling import SamplingParams
from moejax.offload.executor import executor_options

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import stdlib_moe_routing as routing_bench  # noqa: E402  (the held-out split)

RESULTS_JSON = HERE / "offload_cpu.json"
SLOTS = 8
DECODE = {"prompts": 8, "prompt_len": 64, "max_tokens": 32, "policy": "chunked@512"}
PREFILL = {"prompts": 4, "prompt_len": 512, "max_tokens": 4, "policies": ("chunked@128", "layered")}
KEEP = ("hit_rate", "prefetch_precision", "prefetch_recall", "bytes_h2d", "stall_s", "loads_on_demand",
        "loads_transient", "loads_prefetch", "measured_load_s")


def serve(model, prompts, max_tokens: int, policy: str, offload: dict) -> dict:
    """Compile with one run, then time a fresh engine on the same requests."""
    options = dict(policy=policy, max_num_seqs=len(prompts), max_model_len=1024, **executor_options(offload, "stdlib-moe"))
    arrivals = [Arrival(0.0, p, SamplingParams(max_tokens=max_tokens, ignore_eos=True)) for p in prompts]
    build(model, "offload", **options).run(arrivals)
    engine = build(model, "offload", **options)
    t0 = time.perf_counter()
    served = engine.run(arrivals)
    wall = time.perf_counter() - t0
    m = engine.metrics(served)
    s = engine.executor.offload_summary()
    return {"wall_s": wall, "ttft_mean_s": m["ttft_mean_s"], "tbt_mean_s": m["tbt_mean_s"],
            "output_tokens_per_s": m["output_tokens_per_s"], "num_iterations": m["num_iterations"],
            "outputs": [r.output_token_ids for r in served], **{k: s[k] for k in KEEP},
            "stall_s_per_layer": s["per_layer"]["stall_s"], "hit_rate_per_layer": s["per_layer"]["hit_rate"]}


def copy_rate(model) -> dict:
    """One expert host -> device, timed alone (median of 20) on the CPU backend's memory kinds."""
    from moejax.offload.memory import HostExperts

    host = HostExperts(model, jax.local_devices()[0])
    jax.block_until_ready(host.stage(0, 0))
    times = []
    for i in range(20):
        t0 = time.perf_counter()
        jax.block_until_ready(host.stage(i % model.config.num_layers, i % model.config.num_experts))
        times.append(time.perf_counter() - t0)
    t = float(np.median(times))
    return {"expert_bytes": host.expert_bytes, "memory_kind": host.memory_kind, "median_s": t,
            "bytes_per_s": host.expert_bytes / t}


def main() -> int:
    start = time.perf_counter()
    load1 = os.getloadavg()[0]
    train_script = routing_bench.training_script()
    training = json.loads(routing_bench.TRAINING_JSON.read_text())
    model, tokenizer = load_model("stdlib-moe")
    _, heldout = routing_bench.split_streams(train_script, tokenizer, training["data"]["heldout_files"])
    decode_prompts = routing_bench.sequences(heldout, DECODE["prompts"], DECODE["prompt_len"]).tolist()
    prefill_prompts = routing_bench.sequences(heldout, PREFILL["prompts"], PREFILL["prompt_len"]).tolist()

    decode = {}
    for predictor in ("none", "lfru", "gate-ahead", "learned"):
        print(f"decode, predictor {predictor} ...", flush=True)
        decode[predictor] = serve(model, decode_prompts, DECODE["max_tokens"], DECODE["policy"],
                                  {"device_expert_slots": SLOTS, "predictor": predictor, "load_rule": "presched"})
    prefill = {}
    for policy in PREFILL["policies"]:
        print(f"prefill, {policy} ...", flush=True)
        prefill[policy] = serve(model, prefill_prompts, PREFILL["max_tokens"], policy,
                                {"device_expert_slots": SLOTS, "predictor": "none"})
    same = {"decode": all(r["outputs"] == decode["none"]["outputs"] for r in decode.values()),
            "prefill": prefill["layered"]["outputs"] == prefill["chunked@128"]["outputs"]}
    result = {
        "command": "python benchmarks/offload_cpu.py",
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores (no accelerator); shared with other jobs",
        "load_average_1min": {"start": load1, "end": os.getloadavg()[0]},
        "versions": {"python": platform.python_version(), "jax": jax.__version__},
        "model": model.config.name, "dtype": str(model.dtype), "slots": SLOTS, "num_experts": model.config.num_experts,
        "copy": copy_rate(model), "decode_settings": DECODE, "prefill_settings": {**PREFILL, "policies": list(PREFILL["policies"])},
        "decode": decode, "prefill": prefill, "greedy_outputs_equal": same,
        "stall_ratio_to_on_demand": {p: r["stall_s"] / decode["none"]["stall_s"] for p, r in decode.items()},
        "layered_over_chunked": {k: prefill["layered"][k] / prefill["chunked@128"][k]
                                 for k in ("bytes_h2d", "stall_s", "loads_on_demand", "ttft_mean_s")},
        "seconds": time.perf_counter() - start,
    }
    RESULTS_JSON.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("stall_ratio_to_on_demand", "layered_over_chunked", "greedy_outputs_equal")},
                     indent=1))
    print(f"wrote {RESULTS_JSON}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
