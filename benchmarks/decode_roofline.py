"""Decode steps on this machine's accelerator against the roofline, and the simulator's calibration
fitted to the same iterations. Written for a lent GPU (one H200: a Qwen3-30B-A3B-shaped model with
random bf16 weights); it runs anywhere, and on a CPU with a tiny preset it only checks the flow.

    python benchmarks/decode_roofline.py [--model qwen3-30b-a3b] [--hardware h200] [--batches 1 16 64 256]
        [--prompt-len 256] [--new-tokens 32] [--json benchmarks/decode_roofline.json] [--save-calibration]

On the lent machine (its image has jax, flax, orbax, optax, rich, safetensors; no network):
`pip install --no-deps --no-build-isolation -e . && python benchmarks/decode_roofline.py --json $OUT/decode_roofline.json`.

The model is built once; per batch size B, an engine serves B random prompts of --prompt-len tokens,
--new-tokens greedy tokens each, twice: a warm-up (compiles every program), then the measured pass,
in which every iteration's plan and result are kept. It does so with one decode step per program
(each iteration is one step: what the roofline prices) and with the executor's multi-step programs
(what serving runs).

Roofline: the simulator's cost model (moejax.sim.cost_model) prices each measured iteration from
its plan and the experts its routers really chose, at calibration scale 1 and no per-kernel
overhead, on the --hardware preset with its peak matmul rate and HBM bandwidth replaced by the ones
measured in this run (moejax.kernels.benchmark.measure_roofline: a large bf16 matmul, a streaming
copy). Per batch the JSON has, for the decode iterations: measured ms per step, roofline ms per
step, their ratio (the fraction of the roofline reached) and the HBM bytes per step; the same for
the prefill iteration; and ms per step of the multi-step programs. Last, `fit_calibration` over all
one-step iterations: the scale and per-kernel overhead the simulator should use for --hardware
(--save-calibration writes them to moejax/sim/calibration.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import platform
import time
from pathlib import Path

import jax
import numpy as np

from moejax.checkpoint import load_model
from moejax.engine import build
from moejax.engine.jax_executor import MAX_DECODE_STEPS
from moejax.engine.sampling import SamplingParams
from moejax.kernels.benchmark import measure_roofline
from moejax.sim import Calibration, CostModel, fit_calibration, get_hardware, save_calibration

HERE = Path(__file__).resolve().parent
BLOCK = 16


def measured_hardware(name: str, roof: dict):
    """The preset `name` with this run's measured matmul rate and copy bandwidth at efficiency 1."""
    hw = get_hardware(name)
    device = dataclasses.replace(hw.device, peak_flops=roof["matmul_tflops"] * 1e12,
                                 mem_bandwidth=roof["copy_gbps"] * 1e9, flop_efficiency=1.0,
                                 bandwidth_efficiency=1.0)
    return dataclasses.replace(hw, device=device)


def serve(model, batch: int, prompt_len: int, new_tokens: int, steps: int, num_blocks: int, seed: int = 0):
    """Serve `batch` random prompts twice on a fresh engine; the second pass's (plan, result) per
    iteration and its wall seconds. One num_blocks for every batch: the KV cache keeps its shape, so
    engines share the compiled programs of equal row buckets."""
    rng = np.random.default_rng(seed)
    prompts = rng.integers(3, model.config.vocab_size, (batch, prompt_len)).tolist()
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    engine = build(model, "jax", max_num_seqs=batch, max_model_len=prompt_len + new_tokens, block_size=BLOCK,
                   token_budget=max(512, batch * prompt_len), max_decode_steps=steps,
                   num_blocks=num_blocks)
    for measured in (False, True):
        for ids in prompts:
            engine.add_request(ids, params)
        iterations, t0 = [], time.perf_counter()
        while engine.has_unfinished:
            out = engine.step()
            iterations.append((out.plan, out.result))
        jax.effects_barrier()
        wall = time.perf_counter() - t0
    del engine
    gc.collect()
    return iterations, wall


def summarise(iterations, cost_model: CostModel) -> dict:
    """Measured vs roofline per decode step and for the prefill iterations of one-step runs."""
    parts = {"decode": [], "prefill": []}
    for plan, result in iterations:
        if plan.is_empty:
            continue
        cost = cost_model.price(plan, result.layer_stats)
        parts["prefill" if plan.num_prefill_tokens else "decode"].append(
            (result.elapsed_s, cost.roofline_s, cost.hbm_bytes, cost.flops))
    out = {}
    for name, rows in parts.items():
        if not rows:
            continue
        measured, roof, nbytes, flops = (np.array(c) for c in zip(*rows))
        out[name] = {"iterations": len(rows), "ms_per_iteration": 1e3 * float(np.median(measured)),
                     "roofline_ms_per_iteration": 1e3 * float(np.median(roof)),
                     "fraction_of_roofline": float(np.median(roof / measured)),
                     "hbm_bytes_per_iteration": float(np.median(nbytes)), "flops_per_iteration": float(np.median(flops))}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen3-30b-a3b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--hardware", default="h200", help="the simulator's hardware preset this machine is")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 256])
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--json", default=str(HERE / "decode_roofline.json"))
    ap.add_argument("--save-calibration", action="store_true",
                    help="write the fitted calibration for --hardware into moejax/sim/calibration.json")
    args = ap.parse_args()

    backend = jax.default_backend()
    roof = measure_roofline(backend)
    hardware = measured_hardware(args.hardware, roof)
    t0 = time.perf_counter()
    model = load_model(args.model, dtype=args.dtype)[0]
    jax.block_until_ready(model.layer_states)
    load_s = time.perf_counter() - t0
    cost_model = CostModel(model.config, hardware, Calibration(1.0, 0.0, "roofline"))
    rows, samples = [], []
    num_blocks = max(args.batches) * math.ceil((args.prompt_len + args.new_tokens) / BLOCK) + 1
    for batch in args.batches:
        one_step, _ = serve(model, batch, args.prompt_len, args.new_tokens, 1, num_blocks)
        multi, multi_wall = serve(model, batch, args.prompt_len, args.new_tokens, MAX_DECODE_STEPS, num_blocks)
        samples += [(p, r) for p, r in one_step if not p.is_empty]
        decode = [(p, r) for p, r in multi if not p.is_empty and not p.num_prefill_tokens]
        steps = [max(len(t) for t in r.sampled_steps.values()) if p.decode_steps > 1 else 1 for p, r in decode]
        row = {"batch": batch, "one_step_programs": summarise(one_step, cost_model),
               "multi_step_programs": {"iterations": len(decode), "decode_steps": int(sum(steps)),
                                       "ms_per_decode_step": 1e3 * sum(r.elapsed_s for _, r in decode) / max(sum(steps), 1),
                                       "wall_s": multi_wall}}
        rows.append(row)
        d = row["one_step_programs"]["decode"]
        print(f"batch {batch:4d}: decode step {d['ms_per_iteration']:.3f} ms (one-step programs), roofline "
              f"{d['roofline_ms_per_iteration']:.3f} ms ({d['fraction_of_roofline']:.2f} of it), "
              f"{row['multi_step_programs']['ms_per_decode_step']:.3f} ms in multi-step programs", flush=True)
    try:
        fitted = fit_calibration(CostModel(model.config, get_hardware(args.hardware), Calibration()), samples,
                                 source=f"benchmarks/decode_roofline.py on {jax.devices()[0].device_kind}")
    except ValueError as e:  # e.g. one plan shape only
        fitted, why = None, str(e)
    result = {"machine": {"platform": platform.machine(), "backend": backend,
                          "device": jax.devices()[0].device_kind, "devices": jax.device_count(),
                          "cpu_count": os.cpu_count(), "load_average_1min": os.getloadavg()[0]},
              "versions": {"jax": jax.__version__}, "model": args.model, "dtype": args.dtype,
              "hardware_preset": args.hardware, "measured_peaks": roof, "model_build_s": load_s,
              "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "batches": rows,
              "calibration": dataclasses.asdict(fitted) if fitted else {"error": why}}
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(f"calibration for {args.hardware}: {result['calibration']}\n-> {args.json}")
    if args.save_calibration and fitted:
        save_calibration(args.hardware, fitted)


if __name__ == "__main__":
    main()
