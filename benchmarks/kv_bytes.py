"""KV cache bytes per token and per request for every preset, and the hybrid caches measured.

    .venv/bin/python benchmarks/kv_bytes.py        # writes benchmarks/kv_bytes.json and kv_bytes.md

Per preset, from its config (moejax.engine.kv_cache.kv_bytes): bytes one token adds at the start of a
request (every attention layer) and past every window (full-attention layers only), the fixed-size
state a request keeps in Gated DeltaNet layers (Qwen3-Next: `state_slot_bytes`), and the bytes one
request holds at 1k, 8k, 32k and 128k tokens (up to the preset's max_position), exact and in blocks
of 16 tokens, beside what a cache keeping every token in every attention layer would hold. Qwen3-Next
against Qwen3-30B-A3B: the context from which a Qwen3-Next request holds fewer bytes, and one decode
iteration of 64 requests priced by the simulator. Then measured: tiny-gpt-oss and tiny-qwen3-next
served on the engine (one 100-token request, blocks of 4), the bytes its blocks and state slot occupy
in the device arrays at every step of its decode, against kv_bytes.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

from moejax.config import PRESETS, get_preset
from moejax.engine import traffic
from moejax.engine.kv_cache import kv_block_bytes, kv_bytes, kv_groups, state_slot_bytes, window_blocks
from moejax.engine.plan import RowSlice, plan_of
from moejax.sim.hardware import get_hardware
from moejax.sim.pricing import ExpectedPricer

OUT = Path(__file__).with_suffix(".json")
LENGTHS = (1024, 8192, 32768, 131072)
BLOCK = 16
COMPARED = ("qwen3-next-80b-a3b", "qwen3-30b-a3b")
DECODE_ROWS, HARDWARE = 64, "h200x2"
MEASURED = ("tiny-gpt-oss", "tiny-qwen3-next")


def preset_row(name: str) -> dict:
    cfg = get_preset(name)
    far = max(LENGTHS)  # past every window
    row = {
        "architecture": cfg.architecture, "dtype": cfg.dtype, "num_layers": cfg.num_layers,
        "kv_groups": [{"window": g.window, "layers": len(g.layers)} for g in kv_groups(cfg)],
        "linear_layers": sum(cfg.linear_layers), "state_bytes_per_request": state_slot_bytes(cfg),
        "bytes_per_token_first": kv_bytes(cfg, 1) - kv_bytes(cfg, 0),
        "bytes_per_token_past_windows": kv_bytes(cfg, far + 1) - kv_bytes(cfg, far),
        "window_blocks_in_decode": {str(g.window): window_blocks(g.window, BLOCK)
                                    for g in kv_groups(cfg) if g.window is not None},
        "per_request": {},
    }
    for n in LENGTHS:
        if n > cfg.max_position:
            continue
        every_layer = -(-n // BLOCK) * kv_block_bytes(cfg, BLOCK)  # every token of every attention layer, in blocks
        row["per_request"][str(n)] = {"bytes": kv_bytes(cfg, n), "bytes_in_blocks": kv_bytes(cfg, n, BLOCK),
                                      "every_layer_in_blocks": every_layer,
                                      "fraction_of_every_layer": kv_bytes(cfg, n, BLOCK) / every_layer}
    return row


def decode_step(name: str, context: int) -> dict:
    """One decode iteration of DECODE_ROWS requests at `context` tokens, priced on HARDWARE: its KV /
    state bytes, routed-expert bytes with the experts uniform routing activates in expectation, and
    the cost model's seconds."""
    cfg = get_preset(name)
    L = cfg.num_layers
    plan = plan_of(0, [RowSlice(i, context, (5,), 0, L, True, context + 1) for i in range(DECODE_ROWS)], L)
    pricer = ExpectedPricer(cfg, get_hardware(HARDWARE), routing=None)  # uniform inclusion k / E
    stats = traffic.layer_stats(cfg, plan, distinct_experts=pricer.expected_distinct(plan))
    cost = pricer.cost_model.price(plan, stats)
    return {"kv_read_bytes": float(stats.kv_read_bytes.sum()), "kv_write_bytes": float(stats.kv_write_bytes.sum()),
            "expert_bytes": float(stats.expert_bytes.sum()), "modelled_s": cost.seconds}


def comparison(presets: dict) -> dict:
    a, b = (presets[n] for n in COMPARED)
    per_token = [p["bytes_per_token_past_windows"] for p in (a, b)]
    crossover = -(-(a["state_bytes_per_request"] - b["state_bytes_per_request"]) // (per_token[1] - per_token[0]))
    return {"models": list(COMPARED), "crossover_tokens": int(crossover),
            "ratio_per_request": {str(n): a["per_request"][str(n)]["bytes"] / b["per_request"][str(n)]["bytes"]
                                  for n in LENGTHS if str(n) in a["per_request"] and str(n) in b["per_request"]},
            "decode_step": {"rows": DECODE_ROWS, "hardware": HARDWARE,
                            "runs": {name: {str(n): decode_step(name, n) for n in LENGTHS} for name in COMPARED}}}


def measured(name: str) -> dict:
    """One request served on the engine; after each of its decode steps, the bytes its live blocks
    and its state slot occupy in the device arrays vs kv_bytes (exact at steps that allocate a block)."""
    from moejax.engine import build
    from moejax.engine.kv_cache import FREED
    from moejax.engine.sampling import SamplingParams
    from moejax.models.model import build_model

    bs, prompt, new = 4, 100, 20
    model = build_model(get_preset(name), seed=0)
    # one decode step per iteration: the bytes are read after every token
    engine = build(model, max_model_len=128, block_size=bs, max_num_seqs=2, num_blocks=64, max_decode_steps=1)
    ex = engine.executor
    block_bytes = [sum(a.nbytes for i in g.layers for a in ex.kv[i]) // n
                   for g, n in zip(ex.kv_groups, ex.group_num_blocks)]
    slot_bytes = sum(a.nbytes for i in ex.state_layers for a in ex.kv[i]) // max(ex.num_state_slots, 1)
    req = engine.add_request(list(range(1, prompt + 1)), SamplingParams(max_tokens=new, ignore_eos=True))
    steps = []
    while engine.has_unfinished:
        engine.step()
        n = req.num_computed_tokens
        if req.is_finished or n <= prompt:
            continue
        tables = (req.block_ids, *req.group_block_ids)
        live = [sum(b != FREED for b in t) for t in tables]
        steps.append({"tokens": n, "blocks_per_group": live,
                      "device_bytes": sum(k * b for k, b in zip(live, block_bytes)) + slot_bytes,
                      "kv_bytes_in_blocks": kv_bytes(model.config, n, bs), "allocated": (n - 1) % bs == 0})
    return {"model": name, "block_size": bs, "prompt_tokens": prompt,
            "pool_blocks_per_group": list(ex.group_num_blocks), "block_bytes_per_group": block_bytes,
            "state_slot_bytes": slot_bytes, "windows": [g.window for g in ex.kv_groups], "steps": steps}


def mib(x: float) -> str:
    return f"{x / 2**20:,.1f} MiB"


def render(results: dict) -> str:
    lines = ["# KV bytes per token and per request",
             "",
             f"Written by `.venv/bin/python benchmarks/kv_bytes.py` from `kv_bytes.json` ({results['machine']}).",
             "Bytes from each preset's config (`moejax.engine.kv_cache.kv_bytes`): K and V of every token in a",
             "full-attention layer, of the last `window` tokens in a sliding-window layer (MLA: its latent and rope",
             "key), and a request's fixed-size state in Gated DeltaNet layers (Qwen3-Next: the recurrent state in",
             "fp32 and the conv's last inputs, the same at any context); \"in blocks\": the paged cache's whole",
             f"blocks of {BLOCK} tokens; \"every layer\": a cache keeping every token in every attention layer.",
             "",
             "| preset | KV groups (window: layers) | Gated DeltaNet layers | state bytes/request | bytes/token, first | "
             "bytes/token, past windows | " + " | ".join(f"request of {n // 1024}k" for n in LENGTHS) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(LENGTHS)]
    for name, row in results["presets"].items():
        groups = ", ".join(f"{g['window'] or 'full'}: {g['layers']}" for g in row["kv_groups"])
        cells = []
        for n in LENGTHS:
            r = row["per_request"].get(str(n))
            cells.append("–" if r is None else mib(r["bytes_in_blocks"])
                         + (f" ({r['fraction_of_every_layer']:.0%})" if r["fraction_of_every_layer"] < 1 else ""))
        lines.append(f"| {name} | {groups} | {row['linear_layers']} | {row['state_bytes_per_request']:,} | "
                     f"{row['bytes_per_token_first']:,} | {row['bytes_per_token_past_windows']:,} | "
                     + " | ".join(cells) + " |")
    lines += ["", "Percentages: of what the cache would hold keeping every attention layer's every token."]

    c = results["comparison"]
    a, b = c["models"]
    pa, pb = results["presets"][a], results["presets"][b]
    lengths = list(c["ratio_per_request"])
    lines += ["", f"## {a} vs {b}", "",
              f"{a} keeps {pa['bytes_per_token_past_windows']:,} bytes of KV per token (its "
              f"{pa['kv_groups'][0]['layers']} attention layers) against {pb['bytes_per_token_past_windows']:,}, "
              f"plus {mib(pa['state_bytes_per_request'])} of state per request: from {c['crossover_tokens']:,} "
              "tokens on, one of its requests holds fewer bytes.", "",
              "| context | " + " | ".join(f"{int(n):,}" for n in lengths) + " |",
              "|---|" + "---|" * len(lengths),
              f"| bytes per request, {a} / {b} | " + " | ".join(f"{c['ratio_per_request'][n]:.2f}" for n in lengths) + " |"]
    d = c["decode_step"]
    lines += ["", f"One decode iteration of {d['rows']} requests, simulated on {d['hardware']}: KV / state bytes it "
              "reads and writes (`traffic.layer_stats`), routed-expert bytes of the experts uniform routing activates "
              "in expectation, and the cost model's seconds.", "",
              "| model | context | KV + state read | written | routed experts | modelled ms |",
              "|---|---|---|---|---|---|"]
    for name, runs in d["runs"].items():
        for n, st in runs.items():
            lines.append(f"| {name} | {int(n):,} | {mib(st['kv_read_bytes'])} | {mib(st['kv_write_bytes'])} | "
                         f"{mib(st['expert_bytes'])} | {1e3 * st['modelled_s']:.2f} |")

    for m in results["measured"]:
        exact = [st for st in m["steps"] if st["allocated"]]
        lines += ["",
                  f"## Measured: {m['model']} on the engine",
                  "",
                  f"One {m['prompt_tokens']}-token request, blocks of {m['block_size']} tokens, KV groups with windows "
                  f"{m['windows']} (pools of {m['pool_blocks_per_group']} blocks, {m['block_bytes_per_group']} bytes "
                  f"per block on the device), a state slot of {m['state_slot_bytes']:,} bytes. After each decode step:",
                  "",
                  "| tokens | blocks held per group | bytes held on the device | kv_bytes in blocks |",
                  "|---|---|---|---|"]
        for st in m["steps"]:
            mark = "" if st["device_bytes"] == st["kv_bytes_in_blocks"] else \
                " (one window block more: freed at the request's next allocation)"
            lines.append(f"| {st['tokens']} | {tuple(st['blocks_per_group'])} | {st['device_bytes']:,} | "
                         f"{st['kv_bytes_in_blocks']:,}{mark} |")
        lines += ["", f"At the {len(exact)} steps that allocated a block the device bytes equal kv_bytes: "
                  f"{all(st['device_bytes'] == st['kv_bytes_in_blocks'] for st in exact)}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    presets = {name: preset_row(name) for name in sorted(PRESETS)}
    results = {"machine": f"{platform.machine()} CPU, {os.cpu_count()} cores (no accelerator)",
               "block_size": BLOCK, "lengths": list(LENGTHS), "presets": presets,
               "comparison": comparison(presets), "measured": [measured(name) for name in MEASURED]}
    OUT.write_text(json.dumps(results, indent=1) + "\n")
    OUT.with_suffix(".md").write_text(render(results))
    print(render(results))


if __name__ == "__main__":
    main()
