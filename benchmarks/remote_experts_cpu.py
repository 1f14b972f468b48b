"""Micro-batch ping-pong paying off on this machine's CPU: attention in this process pinned to CPU 0,
the routed experts in an expert server process pinned to CPU 1 (executor "remote-experts"), decode
steps with m = 1, 2, 3 micro-batches side by side, against the colocated jax executor in this
process (one core: what one device of the pair does alone), fused (its multi-step decode program)
and layer by layer (fuse=False: one program per layer). Greedy tokens checked identical across all
settings; each pool's busy time and their overlap per decode step; a plot of one decode step's
busy intervals for m = 1 and m = 2.

    .venv/bin/python benchmarks/remote_experts_cpu.py   # -> benchmarks/remote_experts_cpu.json, _timeline.png

The model: Qwen3-MoE-shaped, random weights (fp32; hidden 512, 4 layers, 8 query / 8 KV heads of 64,
8 experts top-2, expert width 512), saved once to benchmarks/.cache so that both processes load the
same checkpoint; shapes chosen so that a decode step's attention and experts take comparable time
(ping-pong can at best hide the shorter behind the longer). Each setting serves the batch once to
compile, then ROUNDS more times, rounds interleaved across settings (this VM's speed drifts): per
round the decode iterations' wall time over their decode steps, the median round per setting.
"""

from __future__ import annotations

import os

os.sched_setaffinity(0, {0})  # before JAX starts: its CPU thread pool is sized by the affinity

import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402

from moejax.checkpoint import load_model, save_model  # noqa: E402
from moejax.config import PRESETS  # noqa: E402
from moejax.engine import build  # noqa: E402
from moejax.engine.sampling import SamplingParams  # noqa: E402
from moejax.models.model import build_model  # noqa: E402
from timeline_plot import plot_pool_spans  # noqa: E402

HERE = Path(__file__).resolve().parent
CKPT = HERE / ".cache" / "pingpong-moe"
CONFIG = dict(name="pingpong-moe", hidden_size=512, num_layers=4, num_heads=8, num_kv_heads=8, head_dim=64,
              num_experts=8, num_experts_per_tok=2, moe_intermediate_size=512)
REQUESTS, PROMPT_LEN, NEW_TOKENS, ROUNDS = 128, 128, 8, 3
SIZES = dict(max_model_len=PROMPT_LEN + NEW_TOKENS, block_size=16, max_num_seqs=REQUESTS,
             num_blocks=REQUESTS * ((PROMPT_LEN + NEW_TOKENS) // 16 + 1), token_budget=REQUESTS * PROMPT_LEN)
SERVER_CPU = "1"


def checkpoint() -> Path:
    if not (CKPT / "config.json").is_file():
        save_model(build_model(PRESETS["tiny-qwen3-moe"].replace(**CONFIG), seed=0), CKPT)
    return CKPT


def serve(engine) -> dict:
    """One pass of the batch -> tokens, decode iterations' wall time and steps (a multi-step iteration
    runs several), pool busy sums, the last decode step's busy spans."""
    params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    reqs = [engine.add_request([(7 * i + 3 * j) % 500 + 3 for j in range(PROMPT_LEN)], params) for i in range(REQUESTS)]
    busy = dict(attention_busy_s=0.0, expert_busy_s=0.0, pool_overlap_s=0.0, pools_wall_s=0.0)
    wall, steps, spans = 0.0, 0, {}
    while engine.has_unfinished:
        t = time.perf_counter()
        out = engine.step()
        if out.plan.num_prefill_tokens:
            continue
        wall, steps = wall + time.perf_counter() - t, steps + out.plan.decode_steps
        pools = getattr(engine.executor, "last_pools", None)
        if pools is not None:
            for k in busy:
                busy[k] += out.result.extra[k]
            t0 = min(a for s in pools.spans.values() for a, _ in s)
            spans = {p: [(a - t0, b - t0) for a, b in s] for p, s in pools.spans.items() if s}
    return {"tokens": [r.output_token_ids for r in reqs], "decode_step_s": wall / steps, **busy, "spans": spans}


def main() -> None:
    load_start = os.getloadavg()[0]
    path = str(checkpoint())
    model = load_model(path)[0]
    engines = {"colocated (jax executor, 1 core)": build(model, "jax", **SIZES),
               "colocated layer by layer (fuse=False, 1 core)": build(model, "jax", fuse=False, **SIZES)}
    for m in (1, 2, 3):
        engines[f"remote-experts m={m}"] = build(path, "remote-experts", micro_batches=m, server_cpus=SERVER_CPU,
                                                 **SIZES)
    tokens = {name: serve(e)["tokens"] for name, e in engines.items()}  # compiles
    passes: dict[str, list[dict]] = {name: [] for name in engines}
    for _ in range(ROUNDS):
        for name, e in engines.items():
            passes[name].append(serve(e))
    reference = tokens["colocated (jax executor, 1 core)"]
    rows = {}
    for name, ps in passes.items():
        wall = sum(p["pools_wall_s"] for p in ps) or None
        rows[name] = {
            "decode_step_ms_median": 1e3 * statistics.median(p["decode_step_s"] for p in ps),
            "decode_step_ms_per_round": [1e3 * p["decode_step_s"] for p in ps],
            "tokens_identical_to_colocated": all(p["tokens"] == reference for p in ps) and tokens[name] == reference,
            **({} if wall is None else {
                "attention_busy": sum(p["attention_busy_s"] for p in ps) / wall,
                "expert_busy": sum(p["expert_busy_s"] for p in ps) / wall,
                "pool_overlap": sum(p["pool_overlap_s"] for p in ps) / wall}),
        }
    base = rows["remote-experts m=1"]["decode_step_ms_median"]
    for r in rows.values():
        r["speed_vs_remote_m1"] = base / r["decode_step_ms_median"]
    result = {
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores (no accelerator); this process on CPU 0, "
                   f"each expert server on CPU {SERVER_CPU}; load average {load_start:.2f} at the start, "
                   f"{os.getloadavg()[0]:.2f} at the end",
        "versions": {"python": platform.python_version(), "jax": jax.__version__},
        "model": CONFIG, "requests": REQUESTS, "prompt_len": PROMPT_LEN, "new_tokens": NEW_TOKENS, "rounds": ROUNDS,
        "settings": rows,
        "timeline_spans_s": {m: passes[f"remote-experts m={m}"][-1]["spans"] for m in (1, 2)},
    }
    (HERE / "remote_experts_cpu.json").write_text(json.dumps(result, indent=1))
    plot_pool_spans(result["timeline_spans_s"], HERE / "remote_experts_cpu_timeline.png", "experts in another process")
    for name, r in rows.items():
        busy = "" if "pool_overlap" not in r else (f", attention busy {r['attention_busy']:.2f}, experts "
                                                   f"{r['expert_busy']:.2f}, overlap {r['pool_overlap']:.2f}")
        print(f"{name}: {r['decode_step_ms_median']:.1f} ms / decode step ({r['speed_vs_remote_m1']:.2f}x m=1)"
              f"{busy}; tokens identical: {r['tokens_identical_to_colocated']}")


if __name__ == "__main__":
    main()
