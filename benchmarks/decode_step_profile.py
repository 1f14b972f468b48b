"""Where decode time goes, per batch size: the engine's stages per iteration (host / dispatch / device)
and a decode step's compiled parts timed alone. Same checkpoint and prompts as decode_vs_hf.py (run
that first: it writes the checkpoint).

    .venv/bin/python benchmarks/decode_step_profile.py [--batches 16 64 256]   # -> decode_step_profile.json

Stage times wrap the engine's own functions with time.perf_counter during one warm generate (BATCH
prompts x NEW_TOKENS tokens), summed over the run and given per decode step (one token per request):
`Model.decode_steps` is the dispatch of a multi-step program (the time until the call returns),
`device_get` where the host waits for it, the rest host work. The parts are the last decode
iteration's inputs captured mid-run, each jitted alone and timed over repeated calls. With run-ahead
(the default) the host's work overlaps the device's, so the stages overlap too: `device_get` is then
what remains of the device's time after the host's. Last, the same generate with run-ahead off and on,
alternating on one engine, best of 3 each.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import moejax.engine.jax_executor as executor_module
from moejax import LLM, SamplingParams
from moejax.engine.engine import Engine
from moejax.engine.scheduler import Scheduler
from moejax.kernels.paged_attention import paged_attention
from moejax.models.model import Model

HERE = Path(__file__).resolve().parent
try:
    from decode_vs_hf import CKPT, NEW_TOKENS, PROMPT_LEN, prompts
except ImportError:  # run as a module from the repository root
    from benchmarks.decode_vs_hf import CKPT, NEW_TOKENS, PROMPT_LEN, prompts


def timed(owner, name: str, totals: dict) -> None:
    """Replace owner.name by a wrapper adding its wall time to totals[name]."""
    fn = getattr(owner, name)

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[name] += time.perf_counter() - t0
    setattr(owner, name, wrapper)
    return fn


def per_call_ms(fn, n: int = 50) -> float:
    jax.block_until_ready(fn())
    t0 = time.perf_counter()
    for _ in range(n):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / n * 1e3


def profile(llm: LLM, batch: int) -> dict:
    params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    captured = {}
    decode_steps = Model.decode_steps

    def capture(self, *args):
        num_steps, remaining = args[3], args[-1]
        if (np.asarray(remaining) >= int(num_steps)).sum() >= batch:  # every request runs all the steps:
            captured["args"] = (self, *args)  # the last such call, decode steps near full context
        return decode_steps(self, *args)
    Model.decode_steps = capture
    for _ in range(2):  # warm-up: compile every shape
        llm.generate(prompts(512, batch), params)
    Model.decode_steps = decode_steps

    totals: dict[str, float] = collections.defaultdict(float)
    executor = executor_module.JaxExecutor
    wrapped = [(Engine, "step"), (Scheduler, "schedule"), (Scheduler, "schedule_ahead"), (Scheduler, "update"),
               (executor, "execute"), (executor, "launch"), (executor, "finish"), (Model, "decode_steps"),
               (executor_module.jax, "device_get")]
    originals = [(owner, name, timed(owner, name, totals)) for owner, name in wrapped]
    t0 = time.perf_counter()
    llm.generate(prompts(512, batch), params)
    wall = time.perf_counter() - t0
    for owner, name, fn in originals:
        setattr(owner, name, fn)
    per_step = {name: seconds / NEW_TOKENS * 1e3 for name, seconds in totals.items()}
    executing = per_step["execute"] + per_step["launch"] + per_step["finish"]  # multi-step plans: launch, finish
    planning = per_step["schedule"] + per_step["schedule_ahead"] + per_step["update"]
    split = {
        "device (waiting for results)": per_step["device_get"],
        "dispatch (decode_steps call)": per_step["decode_steps"],
        "host: schedule + update": planning,
        "host: executor inputs": executing - per_step["decode_steps"] - per_step["device_get"],
        "host: engine and LLM rest": wall / NEW_TOKENS * 1e3 - per_step["step"],
        "host: engine step rest": per_step["step"] - executing - planning,
    }
    run_ahead = {False: [], True: []}  # side by side on this engine, alternating, best of 3
    for _ in range(3):
        for on in run_ahead:
            llm.engine.run_ahead = on
            t0 = time.perf_counter()
            llm.generate(prompts(512, batch), params)
            run_ahead[on].append((time.perf_counter() - t0) / NEW_TOKENS * 1e3)
    llm.engine.run_ahead = True

    model, token_ids, kv, meta, num_steps, max_steps, sampler, *rest = captured["args"]
    cfg = model.config
    R = len(token_ids)
    # kv is the executor's own list: the timed calls donate its buffers and put their results back in it
    x = jnp.ones((R, cfg.hidden_size), model.dtype)
    q = jnp.ones((R, cfg.num_heads, cfg.head_dim), model.dtype)
    layer = nnx.merge(model.layer_defs[0], model.layer_states[0])
    attend = jax.jit(lambda x, kv, meta: layer.attend(x, kv, meta, model.placements.attention))
    attention = jax.jit(partial(paged_attention, scale=cfg.head_dim ** -0.5))

    def program():  # K steps of the whole model; the caches are donated and replaced in kv
        return decode_steps(model, token_ids, kv, meta, num_steps, max_steps, sampler, *rest)

    def fused_layer():
        out, kv[0], counts = model.layer(0, x, kv[0], meta)
        return out
    k_cache, v_cache = kv[0]
    parts = {
        "decode step of the whole model (in the multi-step program)": per_call_ms(program) / int(num_steps),
        "one layer, fused": per_call_ms(fused_layer),
        "one layer: attention block": per_call_ms(lambda: attend(x, kv[0], meta)),
        "one layer: paged attention alone": per_call_ms(lambda: attention(
            q, kv[0][0], kv[0][1], meta.positions, meta.seq_ids, meta.block_tables, meta.num_kv_blocks)),
    }
    return {"batch": batch, "decode_rows": R, "num_kv_blocks": int(meta.num_kv_blocks),
            "iterations": llm.last_stats["iterations"], "ms_per_decode_step": wall / NEW_TOKENS * 1e3,
            "split_ms_per_decode_step": split, "part_ms_per_call": parts,
            "run_ahead_ms_per_decode_step": {"off": min(run_ahead[False]), "on": min(run_ahead[True])}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[16, 64, 256])
    args = ap.parse_args()
    if not CKPT.exists():
        raise SystemExit(f"{CKPT} is missing: run benchmarks/decode_vs_hf.py (make bench-decode) first")
    llm = LLM(str(CKPT), max_model_len=PROMPT_LEN + NEW_TOKENS, max_num_seqs=max(args.batches))
    rows = []
    for batch in args.batches:
        rows.append(profile(llm, batch))
        r = rows[-1]
        print(f"batch {batch}: {r['ms_per_decode_step']:.2f} ms per decode step ({r['iterations']} iterations)")
        ahead = r["run_ahead_ms_per_decode_step"]
        print(f"  run-ahead off / on: {ahead['off']:.3f} / {ahead['on']:.3f} ms per decode step")
        for name, ms in {**r["split_ms_per_decode_step"], **r["part_ms_per_call"]}.items():
            print(f"  {name:60s} {ms:7.3f} ms")
    result = {"machine": f"{platform.machine()} CPU, {os.cpu_count()} cores (no accelerator)",
              "load_average_1min": os.getloadavg()[0], "prompt_len": PROMPT_LEN, "new_tokens": NEW_TOKENS,
              "max_decode_steps": llm.engine.executor.max_decode_steps, "batches": rows}
    (HERE / "decode_step_profile.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
