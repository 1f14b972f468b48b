"""Attention and experts on disjoint pools for real on this machine's CPU (8 XLA CPU devices: 4 attention,
4 experts, layout cpu8-attn4-exp4): the pools' busy time and overlap for m = 1, 2, 3 micro-batches,
and the activation exchange's bytes and messages per form (direct, two-phase with 2 emulated hosts).

    .venv/bin/python benchmarks/disagg_cpu.py      # -> benchmarks/disagg_cpu.json

Each setting serves the same batch twice on one engine (the first pass compiles, untimed); the second
pass's steps are summed. Busy times come from each dispatched piece's ready time (moejax.disagg.timeline):
fractions of the steps' measured wall time. The 8 devices share this machine's cores (and the machine
is shared with other jobs), so the pools cannot both run at full speed: read the overlap and the ratios
between settings, not absolute times.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import jax

jax.config.update("jax_num_cpu_devices", 8)

from moejax.checkpoint import load_model  # noqa: E402
from moejax.engine import build  # noqa: E402
from moejax.engine.sampling import SamplingParams  # noqa: E402

HERE = Path(__file__).resolve().parent
MODEL, LAYOUT = "tiny-qwen3-moe", "cpu8-attn4-exp4"
NUM_REQUESTS, PROMPT_LEN, NEW_TOKENS = 16, 24, 8
KEYS = ("exchange_bytes", "exchange_messages", "exchange_cross_host_bytes", "exchange_cross_host_messages",
        "attention_busy_s", "expert_busy_s", "pool_overlap_s", "pools_wall_s")


def serve(engine) -> dict:
    """One pass of the batch -> summed step metrics (decode steps and the prefill apart)."""
    for i in range(NUM_REQUESTS):
        engine.add_request([(7 * i + j) % 500 for j in range(PROMPT_LEN)],
                           SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True))
    parts = {"prefill": dict.fromkeys(KEYS, 0.0) | {"steps": 0}, "decode": dict.fromkeys(KEYS, 0.0) | {"steps": 0}}
    while engine.has_unfinished:
        out = engine.step()
        part = parts["prefill" if out.plan.num_prefill_tokens else "decode"]
        part["steps"] += 1
        for k in KEYS:
            part[k] += out.result.extra[k]
    for part in parts.values():
        wall = part["pools_wall_s"] or 1.0
        part.update(attention_busy=part["attention_busy_s"] / wall, expert_busy=part["expert_busy_s"] / wall,
                    pool_overlap=part["pool_overlap_s"] / wall,
                    wall_per_step_s=part["pools_wall_s"] / max(part["steps"], 1),
                    exchange_bytes_per_step=part["exchange_bytes"] / max(part["steps"], 1),
                    exchange_messages_per_step=part["exchange_messages"] / max(part["steps"], 1))
    return parts


def measure(model, **options) -> dict:
    engine = build(model, "disagg", max_model_len=64, block_size=8, num_blocks=128, token_budget=512, **options)
    serve(engine)  # compiles
    return serve(engine)


def main() -> None:
    model = load_model(MODEL, layout=LAYOUT)[0]
    micro = {m: measure(model, micro_batches=m, exchange="direct") for m in (1, 2, 3)}
    base = micro[1]["decode"]["wall_per_step_s"]
    for r in micro.values():
        r["decode"]["wall_per_step_vs_m1"] = r["decode"]["wall_per_step_s"] / base
    forms = {f: measure(model, micro_batches=1, exchange=f, emulated_hosts=2) for f in ("direct", "two_phase")}
    result = {
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores (no accelerator), 8 XLA CPU devices; "
                   f"shared with other jobs (load average {os.getloadavg()[0]:.1f} at the end)",
        "versions": {"python": platform.python_version(), "jax": jax.__version__},
        "model": MODEL, "layout": LAYOUT, "requests": NUM_REQUESTS, "prompt_len": PROMPT_LEN,
        "new_tokens": NEW_TOKENS, "micro_batches": micro, "exchange_forms_2_hosts": forms,
    }
    (HERE / "disagg_cpu.json").write_text(json.dumps(result, indent=1))
    for m, r in micro.items():
        d = r["decode"]
        print(f"m={m}: decode attention busy {d['attention_busy']:.2f}, experts {d['expert_busy']:.2f}, "
              f"overlap {d['pool_overlap']:.2f}, step time vs m=1 {d['wall_per_step_vs_m1']:.2f}")
    for f, r in forms.items():
        d = r["decode"]
        print(f"{f}: {d['exchange_bytes_per_step']:.0f} B/step, {d['exchange_messages_per_step']:.0f} messages/step, "
              f"cross-host {d['exchange_cross_host_bytes'] / d['steps']:.0f} B, "
              f"{d['exchange_cross_host_messages'] / d['steps']:.0f} messages")


if __name__ == "__main__":
    main()
