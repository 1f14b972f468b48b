"""KV cache bytes per token and per request for every preset, and the window-aware cache measured.

    .venv/bin/python benchmarks/kv_bytes.py        # writes benchmarks/kv_bytes.json and kv_bytes.md

Per preset, from its config (moejax.engine.kv_cache.kv_bytes): bytes one token adds at the start of a
request (every layer) and past every window (full-attention layers only), and the bytes one request
holds at 1k, 8k, 32k and 128k tokens (up to the preset's max_position), exact and in blocks of 16
tokens, beside what a cache keeping every token in every layer would hold. Then measured: tiny-gpt-oss
served on the engine (one 120-token request, blocks of 4), the bytes its blocks occupy in the device
arrays at every step of its decode, against kv_bytes.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

from moejax.config import PRESETS, get_preset
from moejax.engine.kv_cache import kv_block_bytes, kv_bytes, kv_groups, window_blocks

OUT = Path(__file__).with_suffix(".json")
LENGTHS = (1024, 8192, 32768, 131072)
BLOCK = 16


def preset_row(name: str) -> dict:
    cfg = get_preset(name)
    far = max(LENGTHS)  # past every window
    row = {
        "architecture": cfg.architecture, "dtype": cfg.dtype, "num_layers": cfg.num_layers,
        "kv_groups": [{"window": g.window, "layers": len(g.layers)} for g in kv_groups(cfg)],
        "bytes_per_token_first": kv_bytes(cfg, 1),
        "bytes_per_token_past_windows": kv_bytes(cfg, far + 1) - kv_bytes(cfg, far),
        "window_blocks_in_decode": {str(g.window): window_blocks(g.window, BLOCK)
                                    for g in kv_groups(cfg) if g.window is not None},
        "per_request": {},
    }
    for n in LENGTHS:
        if n > cfg.max_position:
            continue
        every_layer = -(-n // BLOCK) * kv_block_bytes(cfg, BLOCK)  # every token of every layer, in blocks
        row["per_request"][str(n)] = {"bytes": kv_bytes(cfg, n), "bytes_in_blocks": kv_bytes(cfg, n, BLOCK),
                                      "every_layer_in_blocks": every_layer,
                                      "fraction_of_every_layer": kv_bytes(cfg, n, BLOCK) / every_layer}
    return row


def measured_tiny_gpt_oss() -> dict:
    """One request served on the engine; after each of its decode steps, the bytes its live blocks
    occupy in the device arrays vs kv_bytes (exact at steps that allocate a block)."""
    from moejax.engine import build
    from moejax.engine.kv_cache import FREED
    from moejax.engine.sampling import SamplingParams
    from moejax.models.model import build_model

    bs, prompt, new = 4, 100, 20
    model = build_model(get_preset("tiny-gpt-oss"), seed=0)
    # one decode step per iteration: the bytes are read after every token
    engine = build(model, max_model_len=128, block_size=bs, max_num_seqs=2, num_blocks=64, max_decode_steps=1)
    ex = engine.executor
    block_bytes = [sum(ex.kv[i][0].nbytes + ex.kv[i][1].nbytes for i in g.layers) // n
                   for g, n in zip(ex.kv_groups, ex.group_num_blocks)]
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
                      "device_bytes": sum(k * b for k, b in zip(live, block_bytes)),
                      "kv_bytes_in_blocks": kv_bytes(model.config, n, bs), "allocated": (n - 1) % bs == 0})
    return {"model": "tiny-gpt-oss", "block_size": bs, "prompt_tokens": prompt,
            "pool_blocks_per_group": list(ex.group_num_blocks), "block_bytes_per_group": block_bytes,
            "windows": [g.window for g in ex.kv_groups], "steps": steps}


def render(results: dict) -> str:
    lines = ["# KV bytes per token and per request",
             "",
             f"Written by `.venv/bin/python benchmarks/kv_bytes.py` from `kv_bytes.json` ({results['machine']}).",
             "Bytes from each preset's config (`moejax.engine.kv_cache.kv_bytes`): K and V of every token in a",
             "full-attention layer, of the last `window` tokens in a sliding-window layer; \"in blocks\": the paged",
             f"cache's whole blocks of {BLOCK} tokens; \"every layer\": a cache keeping every token in every layer.",
             "",
             "| preset | KV groups (window: layers) | bytes/token, first | bytes/token, past windows | "
             + " | ".join(f"request of {n // 1024}k" for n in LENGTHS) + " |",
             "|---|---|---|---|" + "---|" * len(LENGTHS)]
    for name, row in results["presets"].items():
        groups = ", ".join(f"{g['window'] or 'full'}: {g['layers']}" for g in row["kv_groups"])
        cells = []
        for n in LENGTHS:
            r = row["per_request"].get(str(n))
            cells.append("–" if r is None else f"{r['bytes_in_blocks'] / 2**20:,.1f} MiB"
                         + (f" ({r['fraction_of_every_layer']:.0%})" if r["fraction_of_every_layer"] < 1 else ""))
        lines.append(f"| {name} | {groups} | {row['bytes_per_token_first']:,} | "
                     f"{row['bytes_per_token_past_windows']:,} | " + " | ".join(cells) + " |")
    m = results["measured"]
    exact = [s for s in m["steps"] if s["allocated"]]
    lines += ["",
              "Percentages: of what the cache would hold keeping every layer's every token.",
              "",
              f"## Measured: {m['model']} on the engine",
              "",
              f"One {m['prompt_tokens']}-token request, blocks of {m['block_size']} tokens, windows "
              f"{m['windows']} (pools of {m['pool_blocks_per_group']} blocks, "
              f"{m['block_bytes_per_group']} bytes per block on the device). After each decode step:",
              "",
              "| tokens | blocks held (full, window) | bytes held on the device | kv_bytes in blocks |",
              "|---|---|---|---|"]
    for s in m["steps"]:
        mark = "" if s["device_bytes"] == s["kv_bytes_in_blocks"] else \
            " (one window block more: freed at the request's next allocation)"
        lines.append(f"| {s['tokens']} | {tuple(s['blocks_per_group'])} | {s['device_bytes']:,} | "
                     f"{s['kv_bytes_in_blocks']:,}{mark} |")
    lines += ["", f"At the {len(exact)} steps that allocated a block the device bytes equal kv_bytes: "
              f"{all(s['device_bytes'] == s['kv_bytes_in_blocks'] for s in exact)}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    results = {"machine": f"{platform.machine()} CPU, {os.cpu_count()} cores (no accelerator)",
               "block_size": BLOCK, "lengths": list(LENGTHS),
               "presets": {name: preset_row(name) for name in sorted(PRESETS)},
               "measured": measured_tiny_gpt_oss()}
    OUT.write_text(json.dumps(results, indent=1) + "\n")
    OUT.with_suffix(".md").write_text(render(results))
    print(render(results))


if __name__ == "__main__":
    main()
