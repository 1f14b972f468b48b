"""Sharded execution on 8 CPU devices: per-iteration time of each layout next to one device, the
collectives XLA emitted for a MoE layer under each layout, and compilations in steady state.

    .venv/bin/python benchmarks/sharding_cpu.py        # -> benchmarks/sharding_cpu.json

Not a speed comparison (the 8 CPU "devices" share this machine's cores, so sharding only adds
communication here); it shows which collectives each layout uses and that nothing recompiles once
warm. Greedy outputs are checked identical to the single-device run.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import json  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from moejax.checkpoint import load_model  # noqa: E402
from moejax.engine.compiles import count_compilations  # noqa: E402
from moejax.engine import build  # noqa: E402
from moejax.engine.sampling import SamplingParams  # noqa: E402
from moejax.meshes import LAYOUTS  # noqa: E402

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")


def serve(model, prompts, params):
    engine = build(model, max_model_len=256, block_size=16, token_budget=128, num_blocks=8 * 64)
    reqs = [engine.add_request(p, params) for p in prompts]
    times, kinds = [], []
    while engine.has_unfinished:
        t0 = time.perf_counter()
        out = engine.step()
        times.append(time.perf_counter() - t0)
        kinds.append("decode" if out.plan.num_prefill_tokens == 0 else "mixed")
    return [r.output_token_ids for r in reqs], np.array(times), np.array(kinds)


def layer_collectives(model) -> dict[str, int]:
    """Collective ops in the compiled HLO of a MoE layer's step (the first layer's function)."""
    captured = {}
    original = model.layer

    def spy(i, x, kv, meta):
        captured.setdefault("args", (i, x, kv, meta))
        return original(i, x, kv, meta)

    model.layer = spy
    serve(model, [[5, 6, 7, 8]], SamplingParams(max_tokens=2, ignore_eos=True))
    model.layer = original
    i, x, kv, meta = captured["args"]
    fn = next(f for k, f in model._fns.items() if k[0] == "layer" and k[1] == model.layer_kind[i])
    hlo = fn.lower(model.layer_states[i], model.expert_states[i], x, kv, meta).compile().as_text()
    return {c: len(re.findall(rf"\b{c}(-start)?\(", hlo)) for c in COLLECTIVES}


def main() -> None:
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 500, n).tolist() for n in (40, 120, 64, 200, 16, 90, 150, 33)]
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    layouts = [None] + [n for n in LAYOUTS if n.startswith("cpu8-")]
    results = {"machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, {jax.device_count()} XLA CPU devices",
               "model": "tiny-qwen3-moe", "layouts": {}}
    reference = None
    for name in layouts:
        model, _ = load_model("tiny-qwen3-moe", seed=1, layout=name)
        serve(model, prompts, params)  # warm-up: compiles every bucket the run uses
        with count_compilations() as compiled:
            outputs, times, kinds = serve(model, prompts, params)
        reference = reference or outputs
        entry = {
            "iteration_ms_mean": 1e3 * float(times.mean()),
            "decode_iteration_ms_median": 1e3 * float(np.median(times[kinds == "decode"])),
            "mixed_iteration_ms_median": 1e3 * float(np.median(times[kinds == "mixed"])),
            "iterations": len(times), "compilations_in_steady_state": compiled.count,
            "greedy_identical_to_single_device": outputs == reference,
            "moe_layer_collectives": layer_collectives(model) if name else {c: 0 for c in COLLECTIVES},
            "axes": LAYOUTS[name].axes if name else {}, "rules": LAYOUTS[name].rules if name else {},
        }
        results["layouts"][name or "single-device"] = entry
        print(f"{name or 'single-device':14s} decode {entry['decode_iteration_ms_median']:7.1f} ms  "
              f"mixed {entry['mixed_iteration_ms_median']:7.1f} ms  recompiles {compiled.count}  "
              f"identical {entry['greedy_identical_to_single_device']}  {entry['moe_layer_collectives']}")
    Path(__file__).with_suffix(".json").write_text(json.dumps(results, indent=1, default=list))


if __name__ == "__main__":
    main()
