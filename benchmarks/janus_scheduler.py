"""Janus's activation scheduler against token balancing (EPLB-like): the busiest MoE instance's
distinct activated experts per layer and decode step, on real routing (the shipped trained
`stdlib-moe` over held-out stdlib text) and on the simulator's routing models; and its time.

    .venv/bin/python benchmarks/janus_scheduler.py     # ~3 min on 2 shared cores

Writes benchmarks/janus_scheduler.json and renders benchmarks/janus_scheduler.md from it.

Real routing: expert ids of real forwards (`prompt_routing`, as benchmarks/stdlib_moe_routing.py
records them) over train-split sequences (fit the replica placement: activation frequency per layer)
and held-out sequences (evaluated). A decode step of B rows takes B tokens of distinct held-out
sequences at random positions. Routing models: Qwen3-30B-A3B's and DeepSeek-V2's shapes, decode rows
of distinct requests. Replicas: `place_replicas` fills every instance's spare slots with the hot
experts of each layer; both policies use the same replicas.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import jax
import numpy as np

from moejax.checkpoint import load_model
from moejax.config import get_preset
from moejax.disagg.activation_scheduler import assign_activations, instance_load, place_replicas
from moejax.sim.routing import Rows, make_routing

import stdlib_moe_routing as rt  # noqa: E402  (a sibling script: its directory is on sys.path)

HERE = Path(__file__).resolve().parent
SEQ_LEN, SEQUENCES = 256, 24  # per split
STEPS = 64  # decode steps drawn per setting
SMALL = os.environ.get("MOEJAX_BENCH_SMALL") == "1"


def compare(tokens: np.ndarray, replicas: np.ndarray, instances: int) -> dict:
    """tokens [S, L, E] (S steps), replicas [L, E, R] -> the busiest instance's distinct experts."""
    S, L, E = tokens.shape
    flat = tokens.reshape(S * L, E)
    reps = np.broadcast_to(replicas, (S, *replicas.shape)).reshape(S * L, *replicas.shape[1:])
    out = {}
    for policy in ("janus", "token"):
        assign = np.asarray(assign_activations(flat, reps, instances, policy))
        distinct, load = instance_load(assign, flat, instances)
        out[policy] = {"max_distinct": distinct.max(-1), "max_tokens": load.max(-1)}
    j, t = out["janus"]["max_distinct"], out["token"]["max_distinct"]
    return {"instances": instances, "slots_per_instance": int((replicas >= 0).sum(axis=(1, 2)).max() // instances),
            "cases": int(S * L), "activated_mean": float((flat > 0).sum(-1).mean()),
            "janus_max_distinct_mean": float(j.mean()), "token_max_distinct_mean": float(t.mean()),
            "reduction": float(1 - j.mean() / t.mean()), "janus_better_share": float((j < t).mean()),
            "janus_worse_share": float((j > t).mean()),
            "janus_max_tokens_mean": float(out["janus"]["max_tokens"].mean()),
            "token_max_tokens_mean": float(out["token"]["max_tokens"].mean())}


def real_routing(rng) -> dict:
    train = rt.training_script()
    training = json.loads(rt.TRAINING_JSON.read_text())
    model, tokenizer = load_model("stdlib-moe", dtype="float32")
    cfg = model.config
    train_stream, heldout_stream = rt.split_streams(train, tokenizer, training["data"]["heldout_files"])
    n = SEQUENCES // 3 if SMALL else SEQUENCES
    fit = rt.routing(model, rt.sequences(train_stream, n, SEQ_LEN))  # [S, T, L, K]
    held = rt.routing(model, rt.sequences(heldout_stream, n, SEQ_LEN))
    E, moe = cfg.num_experts, np.flatnonzero(cfg.moe_layers)
    counts = rt.expert_sets(fit, E).sum(axis=(0, 1))[moe]  # [L, E] tokens that chose each expert
    results = []
    for batch in (16, 64):
        steps = np.zeros((STEPS, len(moe), E), np.int64)
        for s in range(STEPS):
            seq = rng.choice(held.shape[0], batch, replace=batch > held.shape[0])
            pos = rng.integers(0, held.shape[1], batch)
            ids = held[seq, pos][:, moe]  # [B, L, K]
            for layer in range(len(moe)):
                steps[s, layer] = np.bincount(ids[:, layer].ravel(), minlength=E)
        for instances, slots in ((4, 10), (8, 6)):
            r = compare(steps, place_replicas(counts, instances, slots), instances)
            results.append({"batch": batch, **r})
    return {"model": cfg.name, "num_experts": E, "top_k": cfg.num_experts_per_tok, "seq_len": SEQ_LEN,
            "fit_sequences": int(fit.shape[0]), "heldout_sequences": int(held.shape[0]), "results": results}


def routing_models(rng) -> list[dict]:
    out = []
    for name in ("qwen3-30b-a3b", "deepseek-v2"):
        cfg = get_preset(name)
        layers = np.flatnonzero(cfg.moe_layers)[:: max(cfg.num_moe_layers // 4, 1)][:4]
        E = cfg.num_experts
        for routing in ("uniform", "zipf", "correlated"):
            model = make_routing(routing, cfg)
            load = model.inclusion[layers].mean(axis=1)
            for batch in (64, 256):
                steps = np.stack([model.draw_layers(layers, Rows(rng.integers(0, 2**62, batch),
                                                                 rng.integers(0, 2**31, batch),
                                                                 np.ones(batch, np.int64)), rng)
                                  for _ in range(STEPS // 4)])
                instances = 8
                slots = E // instances + E // (4 * instances)  # 25% spare slots for replicas
                r = compare(steps, place_replicas(load, instances, slots), instances)
                out.append({"model": name, "routing": routing, "batch": batch, **r})
    return out


def timing() -> list[dict]:
    """Median µs per call (after compiling): one layer [E], and every MoE layer of a step [L, E]."""
    rng = np.random.default_rng(3)
    out = []
    for name, instances in (("stdlib-moe-shape", 8), ("deepseek-v2", 8)):
        E, L, slots = (32, 8, 6) if name != "deepseek-v2" else (160, 59, 25)
        replicas = place_replicas(rng.random(E), instances, slots)
        for layers in (1, L):
            tokens = rng.poisson(2.0, (layers, E)) if layers > 1 else rng.poisson(2.0, E)
            for policy in ("janus", "token"):
                assign_activations(tokens, replicas, instances, policy).block_until_ready()
                times = []
                for _ in range(20):
                    t = time.perf_counter()
                    assign_activations(tokens, replicas, instances, policy).block_until_ready()
                    times.append(time.perf_counter() - t)
                out.append({"shape": name, "experts": E, "layers": layers, "instances": instances,
                            "policy": policy, "median_us": float(np.median(times) * 1e6)})
    return out


def main() -> None:
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    result = {"command": "python benchmarks/janus_scheduler.py",
              "machine": f"{platform.machine()} CPU ({platform.processor() or 'unknown'}), {os.cpu_count()} cores, "
                         "shared with other jobs (timings: medians, noisy)",
              "versions": {"python": platform.python_version(), "jax": jax.__version__},
              "steps_per_setting": STEPS,
              "real_routing": real_routing(rng), "routing_models": routing_models(rng), "timing_us": timing()}
    result["seconds"] = time.perf_counter() - t0
    (HERE / "janus_scheduler.json").write_text(json.dumps(result, indent=1) + "\n")
    render(result)


def render(r: dict) -> None:
    real = r["real_routing"]
    lines = ["# Janus's activation scheduler against token balancing", "",
             f"`{r['command']}` → `benchmarks/janus_scheduler.json` ({r['machine']}); this file is rendered from it.", "",
             "Per MoE layer and decode step every activated expert runs on one of its replicas. **janus**: the "
             "assignment minimising the busiest instance's distinct experts (exact: greedy + augmenting paths), "
             "tokens as the tie-break; **token**: EPLB-like token balancing (experts by descending tokens, each to "
             "the replica instance with the fewest tokens). Same replicas for both (`place_replicas`, fitted to "
             "activation frequencies). Memory-bound MoE time follows the distinct count.", "",
             f"## Real routing: {real['model']} ({real['num_experts']} experts, top-{real['top_k']})", "",
             f"Replicas fitted on {real['fit_sequences']} train-split sequences of {real['seq_len']} tokens; decode "
             f"steps of B rows from {real['heldout_sequences']} held-out sequences, {r['steps_per_setting']} steps.", "",
             "| B | instances x slots | activated experts | busiest instance, janus | token | reduction | janus better / worse | max tokens janus / token |",
             "|---|---|---|---|---|---|---|---|"]
    for x in real["results"]:
        lines.append(f"| {x['batch']} | {x['instances']} x {x['slots_per_instance']} | {x['activated_mean']:.1f} | "
                     f"{x['janus_max_distinct_mean']:.2f} | {x['token_max_distinct_mean']:.2f} | {x['reduction']:.0%} | "
                     f"{x['janus_better_share']:.0%} / {x['janus_worse_share']:.0%} | "
                     f"{x['janus_max_tokens_mean']:.1f} / {x['token_max_tokens_mean']:.1f} |")
    lines += ["", "## Simulator routing models (8 instances, 25% spare slots)", "",
              "| model | routing | B | activated | busiest, janus | token | reduction | janus better / worse |",
              "|---|---|---|---|---|---|---|---|"]
    for x in r["routing_models"]:
        lines.append(f"| {x['model']} | {x['routing']} | {x['batch']} | {x['activated_mean']:.1f} | "
                     f"{x['janus_max_distinct_mean']:.2f} | {x['token_max_distinct_mean']:.2f} | {x['reduction']:.0%} | "
                     f"{x['janus_better_share']:.0%} / {x['janus_worse_share']:.0%} |")
    lines += ["", "## Time (jitted, CPU)", "", "| shape | experts | layers per call | policy | median µs |",
              "|---|---|---|---|---|"]
    for x in r["timing_us"]:
        lines.append(f"| {x['shape']} | {x['experts']} | {x['layers']} | {x['policy']} | {x['median_us']:.0f} |")
    (HERE / "janus_scheduler.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
