"""LayerScope's comparison at the paper's scale, simulated (arXiv 2509.23638): Mixtral-8x7B,
Qwen3-30B-A3B and DeepSeek-V2-Lite on one A100-80GB whose host link is PCIe 3 (a "legacy server"),
a quarter of each layer's experts cached on the device, batches of 4 to 64 decoding together.

    .venv/bin/python benchmarks/offload_sim.py      # ~10 min on 2 CPU cores

Systems (the same engine and scheduler code as the real offload executor; executor "sim-offload"):

    on-demand          every miss loaded when its layer needs it, LRU cache
    MoE-Infinity-like  lfru activation statistics: a frequency/recency cache and prefetch of the next
                       layer's likely experts, layer by layer
    Fiddler-like       on demand, but a miss computed on the host's CPUs when that is faster
    LayerScope         learned predictor (two layers ahead) + PreSched (link and host shared across
                       layers) + host compute

The learned predictor's per-token recall comes from two sources: measured on stdlib-moe's held-out
text (benchmarks/offload_predictors.json), and the best a predictor of each request's routing
distribution could reach under the simulator's routing model (the top-k of the request's inclusion
probabilities). Throughput: output tokens per second; latency: mean time between tokens.
Writes benchmarks/offload_sim.json.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from moejax.config import PRESETS, MLAShape, ModelConfig, RopeConfig, get_preset
from moejax.engine import build
from moejax.engine.engine import Arrival
from moejax.engine.sampling import SamplingParams
from moejax.sim.routing import make_routing

HERE = Path(__file__).resolve().parent
RESULTS_JSON = HERE / "offload_sim.json"
HARDWARE, HOST_LINK = "a100", "pcie3"
CACHED_FRACTION = 0.25
BATCHES = (4, 16, 64)
PROMPT_LEN, OUTPUT_LEN = 256, 64
PAPER = {"arxiv": "2509.23638", "title": "LayerScope: Predictive Cross-Layer Scheduling for Efficient Multi-Batch MoE "
         "Inference on Legacy Servers", "throughput_gain": 1.41, "latency_reduction": 0.746,
         "against": "the best prior offloading system", "per_expert_load_ms": {"qwen3-30b-a3b": 0.55, "mixtral-8x7b": 27}}

# DeepSeek-V2-Lite's published config (no preset yet): 27 layers, the first dense; MLA with kv rank 512;
# 64 routed experts top-6 of width 1408 and 2 shared ones. Its q projection has no LoRA: the rank below
# gives the same q parameters (2048 x 3072 = r x (2048 + 3072)).
DEEPSEEK_V2_LITE = ModelConfig(
    name="deepseek-v2-lite", architecture="deepseek_v2", vocab_size=102400, hidden_size=2048, num_layers=27,
    num_heads=16, num_kv_heads=16, head_dim=192, max_position=32768, rope=RopeConfig(theta=10000.0),
    mla=MLAShape(q_lora_rank=1229, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128),
    num_experts=64, num_experts_per_tok=6, moe_intermediate_size=1408, shared_expert_intermediate_size=2 * 1408,
    dense_intermediate_size=10944, moe_layers=(False,) + (True,) * 26, norm_topk_prob=False)
MODELS = {"mixtral-8x7b": get_preset("mixtral-8x7b"), "qwen3-30b-a3b": get_preset("qwen3-30b-a3b"),
          "deepseek-v2-lite": PRESETS.get("deepseek-v2-lite", DEEPSEEK_V2_LITE)}
SYSTEMS = {
    "on-demand": dict(predictor="none", load_rule="greedy"),
    "MoE-Infinity-like": dict(predictor="lfru", load_rule="greedy"),
    "Fiddler-like": dict(predictor="none", load_rule="greedy", host_compute=True),
    "LayerScope": dict(predictor="learned", load_rule="presched", host_compute=True),
}
BASELINES = ("on-demand", "MoE-Infinity-like", "Fiddler-like")


def routing_model_recall(cfg: ModelConfig) -> float:
    """Per-token top-k recall of a predictor that knows each request's routing distribution under the
    simulator's correlated routing: the mean over layers and request classes of (sum of the k largest
    inclusion probabilities) / k."""
    inclusion = make_routing("correlated", cfg).inclusion  # [L, C, E]
    k = cfg.num_experts_per_tok
    return float((np.sort(inclusion, axis=-1)[..., -k:].sum(-1) / k).mean())


def serve(cfg: ModelConfig, batch: int, **offload) -> dict:
    slots = max(cfg.num_experts_per_tok, round(CACHED_FRACTION * cfg.num_experts))
    engine = build(cfg, "sim-offload", hardware=HARDWARE, host_link=HOST_LINK, device_expert_slots=slots,
                   max_num_seqs=batch, max_model_len=PROMPT_LEN + OUTPUT_LEN + 8, **offload)
    rng = np.random.default_rng(0)
    arrivals = [Arrival(0.0, rng.integers(1, cfg.vocab_size - 1, PROMPT_LEN).tolist(),
                        SamplingParams(max_tokens=OUTPUT_LEN, ignore_eos=True)) for _ in range(batch)]
    served = engine.run(arrivals)
    m = engine.metrics(served)
    s = engine.executor.offload_summary()
    return {"slots": slots, "output_tokens_per_s": m["output_tokens_per_s"], "tbt_mean_s": m["tbt_mean_s"],
            "ttft_mean_s": m["ttft_mean_s"], "duration_s": m["duration_s"],
            **{k: s[k] for k in ("hit_rate", "prefetch_precision", "prefetch_recall", "bytes_h2d", "stall_s",
                                 "loads_on_demand", "loads_prefetch", "loads_transient", "host_experts",
                                 "expert_load_s")}}


def main() -> int:
    start = time.perf_counter()
    measured = json.loads((HERE / "offload_predictors.json").read_text())["recall_by_distance"]["learned"]
    recall_sources = {"stdlib-moe traces": {int(d): r for d, r in measured.items()}}
    runs, table = {}, []
    for name, cfg in MODELS.items():
        from_routing = routing_model_recall(cfg)
        sources = {**recall_sources, "routing model": {1: from_routing, 2: from_routing}}
        runs[name] = {"routing_model_recall": from_routing}
        for batch in BATCHES:
            row = {}
            for system, options in SYSTEMS.items():
                if options["predictor"] == "learned":
                    for source, recall in sources.items():
                        row[f"{system} ({source})"] = serve(cfg, batch, predictor_recall=recall, **options)
                else:
                    row[system] = serve(cfg, batch, **options)
            runs[name][batch] = row
            best = max(BASELINES, key=lambda b: row[b]["output_tokens_per_s"])
            for source in sources:
                ours = row[f"LayerScope ({source})"]
                table.append({"model": name, "batch": batch, "recall_from": source, "best_baseline": best,
                              "throughput_gain": ours["output_tokens_per_s"] / row[best]["output_tokens_per_s"] - 1,
                              "latency_reduction": 1 - ours["tbt_mean_s"] / row[best]["tbt_mean_s"],
                              "gain_over_on_demand": ours["output_tokens_per_s"] / row["on-demand"]["output_tokens_per_s"] - 1})
            print(f"{name} batch {batch}: " + ", ".join(f"{s} {r['output_tokens_per_s']:.1f} tok/s" for s, r in row.items()),
                  flush=True)
    result = {
        "command": "python benchmarks/offload_sim.py",
        "machine": f"simulated: {HARDWARE} with host link {HOST_LINK} (run on {platform.machine()} CPU, "
                   f"{os.cpu_count()} cores)",
        "hardware": HARDWARE, "host_link": HOST_LINK, "cached_fraction": CACHED_FRACTION, "batches": list(BATCHES),
        "prompt_len": PROMPT_LEN, "output_len": OUTPUT_LEN, "routing": "correlated",
        "systems": SYSTEMS, "paper": PAPER, "learned_recall_stdlib": measured,
        "table": table, "runs": runs, "seconds": time.perf_counter() - start,
    }
    RESULTS_JSON.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {RESULTS_JSON}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
