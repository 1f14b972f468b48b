"""KV + state bytes per token and per request for every preset, and what a decode step moves.

    .venv/bin/python benchmarks/kv_state_bytes.py     # writes kv_state_bytes.json and kv_state_bytes.md

Attention layers keep K and V per token (paged blocks); Gated DeltaNet layers (Qwen3-Next) keep one
fixed-size state slot per request (fp32 recurrent state + the conv's last inputs). The bytes are
`moejax.engine.kv_cache.kv_bytes` / `kv_block_bytes` / `state_slot_bytes` (held equal to the real
cache's arrays in tests/test_qwen3_next_engine.py). The decode rows are the simulator's pricing of
one decode iteration (`traffic.layer_stats` bytes, cost model seconds) of 64 requests at a context.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

from moejax.config import PRESETS
from moejax.engine import traffic
from moejax.engine.kv_cache import kv_block_bytes, kv_bytes, state_slot_bytes
from moejax.engine.plan import RowSlice, plan_of
from moejax.sim.hardware import get_hardware
from moejax.sim.pricing import ExpectedPricer

CONTEXTS = (1024, 4096, 32768, 262144)
COMPARED = ("qwen3-next-80b-a3b", "qwen3-30b-a3b")
DECODE_ROWS, HARDWARE = 64, "h200x2"
HERE = Path(__file__).parent


def decode_step(name: str, context: int) -> dict:
    """One decode iteration of DECODE_ROWS requests at `context` tokens, priced on HARDWARE: its KV /
    state bytes, routed-expert bytes with the experts uniform routing activates in expectation, and
    the cost model's seconds."""
    cfg = PRESETS[name]
    L = cfg.num_layers
    plan = plan_of(0, [RowSlice(i, context, (5,), 0, L, True, context + 1) for i in range(DECODE_ROWS)], L)
    pricer = ExpectedPricer(cfg, get_hardware(HARDWARE), routing=None)  # uniform inclusion k / E
    stats = traffic.layer_stats(cfg, plan, distinct_experts=pricer.expected_distinct(plan))
    cost = pricer.cost_model.price(plan, stats)
    return {"kv_read_bytes": float(stats.kv_read_bytes.sum()), "kv_write_bytes": float(stats.kv_write_bytes.sum()),
            "expert_bytes": float(stats.expert_bytes.sum()), "modelled_s": cost.seconds}


def main() -> None:
    presets = {}
    for name, cfg in PRESETS.items():
        presets[name] = {
            "attention_layers": cfg.num_layers - sum(cfg.linear_layers), "linear_layers": sum(cfg.linear_layers),
            "kv_bytes_per_token": kv_block_bytes(cfg, 1), "state_bytes_per_request": state_slot_bytes(cfg),
            "bytes_per_request": {str(n): kv_bytes(cfg, n) for n in CONTEXTS}}
    a, b = (presets[n] for n in COMPARED)
    crossover = -(-(a["state_bytes_per_request"] - b["state_bytes_per_request"])
                  // (b["kv_bytes_per_token"] - a["kv_bytes_per_token"]))
    results = {"machine": f"{platform.machine()} CPU, {os.cpu_count()} cores (pure arithmetic on the configs)",
               "contexts": list(CONTEXTS), "presets": presets,
               "comparison": {"models": list(COMPARED), "crossover_tokens": int(crossover),
                              "ratio_per_request": {str(n): a["bytes_per_request"][str(n)] / b["bytes_per_request"][str(n)]
                                                    for n in CONTEXTS}},
               "decode_step": {"rows": DECODE_ROWS, "hardware": HARDWARE,
                               "runs": {name: {str(n): decode_step(name, n) for n in CONTEXTS} for name in COMPARED}}}
    (HERE / "kv_state_bytes.json").write_text(json.dumps(results, indent=1) + "\n")
    (HERE / "kv_state_bytes.md").write_text(render(results))
    print(render(results))


def render(r: dict) -> str:
    def mb(x):
        return f"{x / 2**20:,.2f}"

    lines = ["# KV + state bytes per token and per request", "",
             "Rendered by `.venv/bin/python benchmarks/kv_state_bytes.py` from `kv_state_bytes.json`. Attention layers "
             "keep K and V per token in paged blocks; Gated DeltaNet layers (Qwen3-Next) keep one fixed-size state slot "
             "per request (the recurrent state in fp32, the conv's last inputs in the model dtype), the same size at any "
             "context. Model dtype as in the preset (bf16 for the real shapes, fp32 for the tiny ones).", "",
             "| preset | attention / linear layers | KV bytes per token | state bytes per request | "
             + " | ".join(f"MiB per request at {n:,}" for n in r["contexts"]) + " |",
             "|---|---|---|---|" + "---|" * len(r["contexts"])]
    for name, p in r["presets"].items():
        lines.append(f"| {name} | {p['attention_layers']} / {p['linear_layers']} | {p['kv_bytes_per_token']:,} | "
                     f"{p['state_bytes_per_request']:,} | "
                     + " | ".join(mb(p["bytes_per_request"][str(n)]) for n in r["contexts"]) + " |")
    c = r["comparison"]
    a, b = c["models"]
    lines += ["", f"## {a} vs {b}", "",
              f"{a} keeps {r['presets'][a]['kv_bytes_per_token']:,} bytes of KV per token (its "
              f"{r['presets'][a]['attention_layers']} attention layers) against {r['presets'][b]['kv_bytes_per_token']:,}, "
              f"plus {mb(r['presets'][a]['state_bytes_per_request'])} MiB of state per request: from "
              f"{c['crossover_tokens']:,} tokens on, one of its requests holds fewer bytes.", "",
              "| context | " + " | ".join(f"{n:,}" for n in r["contexts"]) + " |",
              "|---|" + "---|" * len(r["contexts"]),
              f"| bytes per request, {a} / {b} | "
              + " | ".join(f"{c['ratio_per_request'][str(n)]:.2f}" for n in r["contexts"]) + " |"]
    d = r["decode_step"]
    lines += ["", f"## One decode iteration of {d['rows']} requests (simulated, {d['hardware']})", "",
              "KV / state bytes the iteration reads and writes (`traffic.layer_stats`), routed-expert bytes of the "
              "experts uniform routing activates in expectation, and the cost model's seconds.", "",
              "| model | context | KV + state read, MiB | written, MiB | routed-expert MiB | modelled ms |",
              "|---|---|---|---|---|---|"]
    for name, runs in d["runs"].items():
        for n, s in runs.items():
            lines.append(f"| {name} | {int(n):,} | {mb(s['kv_read_bytes'])} | {mb(s['kv_write_bytes'])} | "
                         f"{mb(s['expert_bytes'])} | {1e3 * s['modelled_s']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
