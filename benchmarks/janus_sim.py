"""Janus (attention-expert disaggregation, activation scheduler, SLO-aware planner) against colocated
EP (SGLang-like) and a fixed-ratio token-balanced split (MegaScale-Infer-like), simulated at
DeepSeek-V2 and Qwen3-235B-A22B scale on H100s.

    .venv/bin/python benchmarks/janus_sim.py          # ~5-10 min on 2 shared cores

Writes benchmarks/janus_sim.json and renders benchmarks/janus_sim.md from it. Every number is the
cost model's (moejax/sim/disagg.py; its docstring states the step-time model), searched by
moejax/disagg/planner.py; `moejax plan --model deepseek-v2 --rate 16 --slo-tpot 0.05 --compare`
gives any single row.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from moejax.config import get_preset
from moejax.disagg.planner import SYSTEMS, Planner
from moejax.sim.disagg import DisaggCostModel
from moejax.sim.hardware import get_hardware
from moejax.sim.routing import make_routing

HERE = Path(__file__).resolve().parent
MODELS = ("deepseek-v2", "qwen3-235b-a22b")
RATES = (1, 4, 16, 48)  # requests/s
PUBLISHED = {"arxiv": "2512.13525",
             "title": "Janus: Disaggregating Attention and Experts for Scalable MoE Inference",
             "per_gpu_throughput_vs_sglang_like": "up to 4.7x",
             "per_gpu_throughput_vs_megascale_infer_like": "up to 2.2x"}


def summary(plan) -> dict:
    d = plan.to_dict()
    d.pop("placement", None)
    return d


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hardware", default="h100")
    ap.add_argument("--slo-tpot", type=float, default=0.05)
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=512)
    ap.add_argument("--routing", default="correlated")
    ap.add_argument("--max-gpus", type=int, default=32)
    ap.add_argument("--out", default=str(HERE / "janus_sim.json"))
    args = ap.parse_args()
    results = {"machine": {"node": platform.node(), "processor": platform.processor() or platform.machine(),
                           "cpus": os.cpu_count(), "note": "simulated: the host only runs the cost model"},
               "command": "benchmarks/janus_sim.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in
                                                                 vars(args).items() if k != "out"),
               "settings": vars(args), "published": PUBLISHED, "models": {}}
    for name in MODELS:
        t0 = time.perf_counter()
        cfg = get_preset(name)
        cost = DisaggCostModel(cfg, get_hardware(args.hardware), make_routing(args.routing, cfg),
                               context_len=args.prompt_len + args.output_len // 2,
                               max_len=args.prompt_len + args.output_len)
        planner = Planner(cost, args.slo_tpot, max_gpus=args.max_gpus)
        best = {s: planner.best_per_gpu(s) for s in SYSTEMS}
        rates = {}
        for rate in RATES:
            plans = {s: planner.plan(rate, args.output_len, s) for s in SYSTEMS}
            rates[str(rate)] = {s: summary(p) for s, p in plans.items()}
        results["models"][name] = {
            "expert_slots_per_moe_gpu": cost.max_expert_slots(), "non_expert_weights_gb": cost.dense_bytes / 1e9,
            "best_per_gpu": {s: summary(p) if p else None for s, p in best.items()},
            "rates": rates, "search_seconds": time.perf_counter() - t0}
        print(f"{name}: searched in {time.perf_counter() - t0:.0f} s", flush=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    render(results, Path(args.out).with_suffix(".md"))


def render(results: dict, path: Path) -> None:
    s = results["settings"]
    lines = [
        "# Janus: attention-expert disaggregation, simulated",
        "",
        f"`{results['command']}` → `benchmarks/janus_sim.json` (this file is rendered from it).",
        "",
        f"Decode at TPOT SLO {s['slo_tpot']} s on {s['hardware']} GPUs (at most {s['max_gpus']}), prompts of "
        f"{s['prompt_len']} and outputs of {s['output_len']} tokens, `{s['routing']}` routing. Systems, one cost "
        "model (moejax/sim/disagg.py): **janus** (attention and MoE instances sized independently, hot experts "
        "replicated into spare slots, the activation scheduler, 1-3 micro-batches), **megascale** "
        "(MegaScale-Infer-like: disaggregated at a fixed 1:1 attention:MoE ratio, the same replicas served "
        "token-balanced), **colocated** (SGLang-like DP attention + EP on the same GPUs, no overlap).",
        "",
    ]
    for name, m in results["models"].items():
        best = m["best_per_gpu"]
        lines += [f"## {name}", "",
                  f"Non-expert weights {m['non_expert_weights_gb']:.1f} GB (every attention instance holds them); "
                  f"an MoE GPU holds {m['expert_slots_per_moe_gpu']} experts of every MoE layer.", "",
                  "Best tokens/s per GPU within the SLO:", "",
                  "| system | GPUs | attention + MoE | micro-batches | batch | TPOT ms | tokens/s/GPU | busiest MoE GPU's distinct experts |",
                  "|---|---|---|---|---|---|---|---|"]
        for sysname, p in best.items():
            if p is None:
                lines.append(f"| {sysname} | — | no deployment meets the SLO | | | | | |")
                continue
            lines.append(f"| {sysname} | {p['gpus']} | {p['attention_instances']} + {p['moe_instances']} | "
                         f"{p['micro_batches']} | {p['batch']} | {p['tpot_s'] * 1e3:.1f} | {p['tokens_s_per_gpu']:.0f} | "
                         f"{p['step']['max_distinct_experts']:.1f} |")
        j = best["janus"]
        for other in ("colocated", "megascale"):
            if j and best[other]:
                lines.append(f"\njanus / {other}: **{j['tokens_s_per_gpu'] / best[other]['tokens_s_per_gpu']:.2f}×** "
                             "tokens/s per GPU at their best operating points.")
        lines += ["", "Fewest GPUs serving a request rate within the SLO. At one demand, tokens/s per GPU = demand / "
                  "GPUs, so Janus's per-GPU throughput over another system's is that system's GPUs over Janus's "
                  "(the last two columns):", "",
                  "| rate req/s | janus GPUs (attn + MoE, m) | megascale GPUs | colocated GPUs | janus tok/s/GPU | "
                  "vs megascale | vs colocated |", "|---|---|---|---|---|---|---|"]
        for rate, plans in m["rates"].items():
            def cell(p):
                return f"{p['gpus']}" + ("" if p["feasible"] else " (infeasible)")
            jp, mp, cp = plans["janus"], plans["megascale"], plans["colocated"]
            per_gpu = f"{jp['demand_tokens_s'] / jp['gpus']:.0f}" if jp["feasible"] else "—"
            ratio = {k: (f"{p['gpus'] / jp['gpus']:.2f}×" if p["feasible"] and jp["feasible"] else "—")
                     for k, p in (("m", mp), ("c", cp))}
            lines.append(f"| {rate} | {cell(jp)} ({jp['attention_instances']} + {jp['moe_instances']}, "
                         f"{jp['micro_batches']}) | {cell(mp)} | {cell(cp)} | {per_gpu} | {ratio['m']} | {ratio['c']} |")
        lines.append("")
    p = results["published"]
    lines += ["## Against the paper", "",
              f"arXiv {p['arxiv']} \"{p['title']}\" reports {p['per_gpu_throughput_vs_sglang_like']} per-GPU "
              f"throughput against SGLang-like colocated serving and {p['per_gpu_throughput_vs_megascale_infer_like']} "
              "against MegaScale-Infer-like disaggregation. The ratios above are this cost model's, and they "
              "differ:", "",
              "- **Where Janus wins here**: at low and moderate rates, by sizing the two pools apart. Its smallest "
              "deployment is one attention GPU plus the MoE GPUs the experts need, where colocated EP must give "
              "every GPU the non-expert weights and an even share of the experts (G dividing E), and MegaScale-like "
              "keeps its 1:1 ratio. Against MegaScale-like at equal replicas the activation scheduler also lowers "
              "the busiest MoE GPU's distinct experts (last column of the best-per-GPU tables), which is MoE time "
              "in memory-bound decode.",
              "- **Where it loses here**: at the highest per-GPU throughput colocated EP is ahead. In this roofline "
              "model colocated DP attention + EP already aggregates every GPU's tokens at each expert (the "
              "all-to-all), and gets the memory bandwidth of all G GPUs for attention, which dominates decode "
              "(every attention instance streams all non-expert weights per step and micro-batch); a "
              "disaggregated deployment leaves its MoE GPUs idle whenever attention and exchange + MoE do not "
              "balance, and its exchange sits between the pools on every layer. Colocated here has no EP "
              "load-imbalance penalty beyond the routing draw, no framework overheads and a free choice of G "
              "among E's divisors; the paper measures real systems, where these (and its baselines' "
              "configurations, which we do not reproduce) matter.",
              "- Not modelled: prefill, KV transfer, attention tensor parallelism inside an instance, "
              "stragglers, and the time the scheduler itself takes per layer (benchmarks/janus_scheduler.md "
              "measures it on CPU).", ""]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
