"""Attention and experts on disjoint pools for real on this machine's CPU (8 XLA CPU devices: 4 attention,
4 experts, layout cpu8-attn4-exp4): the pools' busy time, overlap and step time for m = 1, 2, 3
micro-batches with the exchange as one `jax.device_put` per array ("device_put") and as the plan's
point-to-point messages ("messages", the earlier transport) side by side; the activation exchange's
bytes and messages per form (direct, two-phase with 2 emulated hosts); the per-instance balance of
the janus and token activation policies with expert replicas; a plot of each pool's busy intervals in
one decode step for m = 1 and m = 2.

    .venv/bin/python benchmarks/disagg_cpu.py      # -> benchmarks/disagg_cpu.json, disagg_cpu_timeline.png

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
from timeline_plot import plot_pool_spans  # noqa: E402

HERE = Path(__file__).resolve().parent
MODEL, LAYOUT = "tiny-qwen3-moe", "cpu8-attn4-exp4"
NUM_REQUESTS, PROMPT_LEN, NEW_TOKENS = 16, 24, 8
KEYS = ("exchange_bytes", "exchange_messages", "exchange_cross_host_bytes", "exchange_cross_host_messages",
        "attention_busy_s", "expert_busy_s", "pool_overlap_s", "pools_wall_s", "distinct_experts_max",
        "distinct_experts_mean", "instance_tokens_max", "instance_tokens_mean")
TRANSPORTS = {"device_put": True, "messages": False}  # Exchange.pool_moves


def serve(engine) -> tuple[dict, dict]:
    """One pass of the batch -> (summed step metrics, decode steps and the prefill apart; the busy spans
    of the last decode step, from its first dispatch)."""
    for i in range(NUM_REQUESTS):
        engine.add_request([(7 * i + j) % 500 for j in range(PROMPT_LEN)],
                           SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True))
    parts = {"prefill": dict.fromkeys(KEYS, 0.0) | {"steps": 0}, "decode": dict.fromkeys(KEYS, 0.0) | {"steps": 0}}
    spans = {}
    while engine.has_unfinished:
        out = engine.step()
        part = parts["prefill" if out.plan.num_prefill_tokens else "decode"]
        part["steps"] += 1
        for k in KEYS:
            part[k] += out.result.extra[k]
        if not out.plan.num_prefill_tokens:
            pools = engine.executor.last_pools.spans
            t0 = min(a for s in pools.values() for a, _ in s)
            spans = {p: [(a - t0, b - t0) for a, b in s] for p, s in pools.items()}
    for part in parts.values():
        wall, steps = part["pools_wall_s"] or 1.0, max(part["steps"], 1)
        part.update(attention_busy=part["attention_busy_s"] / wall, expert_busy=part["expert_busy_s"] / wall,
                    pool_overlap=part["pool_overlap_s"] / wall, wall_per_step_s=part["pools_wall_s"] / steps,
                    **{f"{k}_per_step": part[k] / steps for k in KEYS[:4]},
                    **{k: part[k] / steps for k in KEYS[8:]})  # per-step means of the step averages
    return parts, spans


def measure(model, transport: str = "device_put", **options) -> tuple[dict, dict]:
    engine = build(model, "disagg", max_model_len=64, block_size=8, num_blocks=128, token_budget=512, **options)
    engine.executor.exchange.pool_moves = TRANSPORTS[transport]
    serve(engine)  # compiles
    return serve(engine)


def main() -> None:
    load_start = os.getloadavg()[0]
    model = load_model(MODEL, layout=LAYOUT)[0]
    micro, spans = {}, {}
    for m in (1, 2, 3):  # both transports of one m side by side: the machine's load drifts over the run
        for transport in TRANSPORTS:
            micro[f"{transport} m={m}"], s = measure(model, transport, micro_batches=m, exchange="direct")
            if transport == "device_put" and m < 3:
                spans[m] = s
    base = micro["device_put m=1"]["decode"]["wall_per_step_s"]
    for r in micro.values():
        r["decode"]["wall_per_step_vs_device_put_m1"] = r["decode"]["wall_per_step_s"] / base
    forms = {f: measure(model, micro_batches=1, exchange=f, emulated_hosts=2)[0] for f in ("direct", "two_phase")}
    replicas = {p: measure(model, micro_batches=1, replicas="auto", expert_slots=6, activation_policy=p)[0]
                for p in ("janus", "token")}
    result = {
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores (no accelerator), 8 XLA CPU devices; "
                   f"shared with other jobs (load average {load_start:.1f} at the start, "
                   f"{os.getloadavg()[0]:.1f} at the end)",
        "versions": {"python": platform.python_version(), "jax": jax.__version__},
        "model": MODEL, "layout": LAYOUT, "requests": NUM_REQUESTS, "prompt_len": PROMPT_LEN,
        "new_tokens": NEW_TOKENS, "micro_batches": micro, "exchange_forms_2_hosts": forms,
        "replicas_6_slots": replicas, "timeline_spans_s": spans,
    }
    (HERE / "disagg_cpu.json").write_text(json.dumps(result, indent=1))
    plot_pool_spans(spans, HERE / "disagg_cpu_timeline.png", "device_put exchange")
    for name, r in micro.items():
        d = r["decode"]
        print(f"{name}: decode attention busy {d['attention_busy']:.2f}, experts {d['expert_busy']:.2f}, "
              f"overlap {d['pool_overlap']:.2f}, step {d['wall_per_step_s'] * 1e3:.1f} ms "
              f"({d['wall_per_step_vs_device_put_m1']:.2f} x device_put m=1)")
    for f, r in forms.items():
        d = r["decode"]
        print(f"{f}: {d['exchange_bytes_per_step']:.0f} B/step, {d['exchange_messages_per_step']:.0f} messages/step, "
              f"cross-host {d['exchange_cross_host_bytes_per_step']:.0f} B, "
              f"{d['exchange_cross_host_messages_per_step']:.0f} messages")
    for p, r in replicas.items():
        d = r["decode"]
        print(f"{p}: distinct experts per instance max {d['distinct_experts_max']:.2f} mean "
              f"{d['distinct_experts_mean']:.2f}, tokens max {d['instance_tokens_max']:.1f} mean "
              f"{d['instance_tokens_mean']:.1f}")


if __name__ == "__main__":
    main()
