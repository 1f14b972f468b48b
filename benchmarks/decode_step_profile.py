"""Where a decode step's time goes: the stages of one engine iteration, and the step's compiled parts
timed alone. Same checkpoint and prompts as decode_vs_hf.py (run that first: it writes the checkpoint).

    .venv/bin/python benchmarks/decode_step_profile.py     # writes benchmarks/decode_step_profile.json

Stage times wrap the engine's own functions with time.perf_counter during one warm generate (16
prompts x 128 tokens), averaged per step. `device_get` is where the host waits for the compiled step;
`forward_all` is its dispatch (the time until the call returns). The parts are a
decode step's inputs captured mid-run, each jitted alone and timed over repeated calls.
"""

from __future__ import annotations

import collections
import json
import os
import platform
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

import moejax.engine.jax_executor as executor_module
from moejax import LLM, SamplingParams
from moejax.engine.scheduler import Scheduler
from moejax.kernels.paged_attention import paged_attention
from moejax.models.model import Model

HERE = Path(__file__).resolve().parent
try:
    from decode_vs_hf import BATCH, CKPT, NEW_TOKENS, PROMPT_LEN, prompts
except ImportError:  # run as a module from the repository root
    from benchmarks.decode_vs_hf import BATCH, CKPT, NEW_TOKENS, PROMPT_LEN, prompts


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


def per_call_ms(fn, n: int = 200) -> float:
    jax.block_until_ready(fn())
    t0 = time.perf_counter()
    for _ in range(n):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / n * 1e3


def main() -> None:
    if not CKPT.exists():
        raise SystemExit(f"{CKPT} is missing: run benchmarks/decode_vs_hf.py (make bench-decode) first")
    llm = LLM(str(CKPT), max_model_len=PROMPT_LEN + NEW_TOKENS, max_num_seqs=BATCH)
    params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)

    captured = {}
    forward_all = Model.forward_all

    def capture(self, *args):
        captured["args"] = (self, *args)  # the last call: a decode step at full context
        return forward_all(self, *args)
    Model.forward_all = capture
    for _ in range(2):  # warm-up: compile every shape
        llm.generate(prompts(512), params)
    Model.forward_all = forward_all

    totals: dict[str, float] = collections.defaultdict(float)
    for owner, name in [(executor_module, "attention_metadata"), (executor_module, "layer_stats"),
                        (executor_module.JaxExecutor, "_sampling_inputs"), (executor_module.JaxExecutor, "_layout"),
                        (Model, "forward_all"), (executor_module.jax, "device_get"),
                        (Scheduler, "schedule"), (Scheduler, "update")]:
        timed(owner, name, totals)
    t0 = time.perf_counter()
    llm.generate(prompts(512), params)
    steps = llm.last_stats["iterations"]
    step_ms = (time.perf_counter() - t0) / steps * 1e3
    stages = {name: seconds / steps * 1e3 for name, seconds in sorted(totals.items(), key=lambda kv: -kv[1])}

    model, token_ids, kv, meta, rows, head, *head_args = captured["args"]
    kv = list(kv)
    layer = nnx.merge(model.layer_defs[0], model.layer_states[0])
    io = nnx.merge(model.io_def, model.io_state)
    x = jnp.ones((len(token_ids), model.config.hidden_size), model.dtype)
    q = jnp.ones((len(token_ids), model.config.num_heads, model.config.head_dim), model.dtype)
    attend = jax.jit(lambda x, kv, meta: layer.attend(x, kv, meta))
    ffn = jax.jit(lambda x, valid: layer.feed_forward(x, valid))
    attention = jax.jit(partial(paged_attention, scale=model.config.head_dim ** -0.5))
    head_fn = jax.jit(lambda x, rows, *args: head(io.logits(jnp.take(x, rows, axis=0)), *args))
    empty = jax.jit(lambda x: x + 1)
    whole = per_call_ms(lambda: forward_all(model, token_ids, kv, meta, rows, head, *head_args))
    k_cache, v_cache = kv[0]  # the whole step donated and replaced the caches it was given
    parts = {
        "whole step (embed, all layers, logits, sampling)": whole,
        "one layer: attention block": per_call_ms(lambda: attend(x, kv[0], meta)),
        "one layer: paged attention alone": per_call_ms(lambda: attention(
            q, k_cache, v_cache, meta.positions, meta.seq_ids, meta.block_tables, meta.num_kv_blocks)),
        "one layer: MoE block": per_call_ms(lambda: ffn(x, meta.valid)),
        "logits + sampling": per_call_ms(lambda: head_fn(x, rows, *head_args)),
        "an empty jitted call": per_call_ms(lambda: empty(x)),
    }
    result = {"machine": f"{platform.machine()} CPU, {os.cpu_count()} cores (no accelerator)",
              "load_average_1min": os.getloadavg()[0], "decode_rows": len(token_ids),
              "num_kv_blocks": int(meta.num_kv_blocks), "step_ms": step_ms, "stage_ms_per_step": stages,
              "part_ms_per_call": parts}
    (HERE / "decode_step_profile.json").write_text(json.dumps(result, indent=1))
    print(f"step {step_ms:.2f} ms; stages (ms/step):")
    for name, ms in stages.items():
        print(f"  {name:22s} {ms:6.3f}")
    print("compiled parts alone (ms/call):")
    for name, ms in parts.items():
        print(f"  {name:50s} {ms:6.3f}")


if __name__ == "__main__":
    main()
