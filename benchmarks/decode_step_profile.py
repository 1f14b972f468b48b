"""Where decode time goes, per batch size: the engine's stages per iteration (host / dispatch / device) and
a decode step's compiled parts timed alone. Same checkpoint and prompts as decode_vs_hf.py (run that
first: it writes the checkpoint).

    .venv/bin/python benchmarks/decode_step_profile.py [--batches 16 64 256]   # -> decode_step_profile.json

Stage times wrap the engine's own functions with time.perf_counter during one warm generate (BATCH
prompts x NEW_TOKENS tokens), summed over the run and given per decode step (one token per request):
`Model.decode_steps` is the dispatch of a multi-step program (the time until the call returns),
`device_get` where the host waits for it, the rest host work. The parts are the last decode iteration's
inputs captured mid-run, each jitted alone and timed over repeated calls; the multi-step program is also
traced once (jax.profiler) and its operations' times summed by kind per decode step (the native kernels
by their custom-call target, YNNPACK's fusions, every other XLA operation). With run-ahead (the
default) the host's work overlaps the device's, so the stages overlap too: `device_get` is then what
remains of the device's time after the host's. Then the same generate with run-ahead off and on,
alternating on one engine, best of 3 each. Then a kernel ablation: engines that differ only in one
native kernel (removed, or paged attention run twice per layer), alternating, best of 3: what each
kernel costs inside the program, with its KV and weights coming from memory. Last, two floors for the
step, each measured on this machine in the same run: memory, the bytes a decode step must read (every
row's KV at the run's mean context, the layers' weights with the routed experts the step activated, the
LM head) over the read bandwidth of both cores (numpy threads streaming arrays past the last-level
cache); compute, its multiply-adds (projections, the k routed experts of each row, attention over the
mean context, the LM head) at the float32 GEMM rate of a large numpy matmul (its BLAS on every core).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import re
import tempfile
import threading
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import moejax.engine.jax_executor as executor_module
from moejax import LLM, SamplingParams, kernels
from moejax.engine.engine import Engine
from moejax.engine.scheduler import Scheduler
from moejax.engine.traffic import layer_shapes
from moejax.kernels import native
from moejax.kernels.paged_attention import paged_attention
from moejax.models.model import Model

try:
    from decode_vs_hf import CKPT, NEW_TOKENS, PROMPT_LEN, prompts, write_json
except ImportError:  # run as a module from the repository root
    from benchmarks.decode_vs_hf import CKPT, NEW_TOKENS, PROMPT_LEN, prompts, write_json


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


MEAN_KEYS = PROMPT_LEN + NEW_TOKENS / 2  # keys a decode step attends, on average over the run (step s: PROMPT_LEN + s)
NATIVE_KINDS = {"moejax_paged_attention": "paged attention (native)", "moejax_moe_ffn": "routed experts (native)",
                "moejax_matmul": "projections, norms, router, LM head (native dense)",
                "moejax_top_k": "router top-k, greedy argmax (native top-k)"}


def traced_split(run, hlo: str, steps: int) -> dict:
    """ms per decode step by kind of operation inside one call of a multi-step program (`run`, its
    compiled text `hlo`, `steps` decode steps): each operation's thunk time from a jax.profiler trace;
    control flow (while, conditional) is not counted itself, only what runs inside it."""
    targets = dict(re.findall(r'%(\S+) = [^\n]*custom_call_target="(moejax_\w+)"', hlo))
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            jax.block_until_ready(run())
        events = json.loads(gzip.decompress(next(Path(trace_dir).rglob("*.trace.json.gz")).read_bytes()))
    kinds: dict[str, float] = collections.defaultdict(float)
    for e in events["traceEvents"]:
        op = e.get("args", {}).get("hlo_op") if e.get("ph") == "X" else None
        if op is None or op.startswith(("while", "cond")):
            continue
        kind = NATIVE_KINDS.get(targets.get(op)) or ("YNNPACK fusions (row reductions)" if op.startswith("ynn_fusion")
                                                     else "other XLA operations")
        kinds[kind] += e["dur"] / 1e3 / steps
    return dict(sorted(kinds.items(), key=lambda kv: -kv[1]))


def stream_read_gbps(threads: int, mib: int = 64, repeats: int = 5) -> float:
    """Memory read bandwidth: `threads` threads each summing its own array of `mib` MiB (past the
    last-level cache; numpy releases the GIL in the sum), best of `repeats` passes."""
    arrays = [np.ones((mib << 20) // 4, np.float32) for _ in range(threads)]
    best = 0.0
    for _ in range(repeats):
        workers = [threading.Thread(target=a.sum) for a in arrays]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = max(best, threads * arrays[0].nbytes / (time.perf_counter() - t0) / 1e9)
    return best


def gemm_gmacs(n: int = 1024, repeats: int = 10) -> float:
    """This machine's float32 GEMM rate in multiply-adds per second (billions): numpy's BLAS, n x n x n."""
    a, b = (np.ones((n, n), np.float32) for _ in range(2))
    a @ b
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return repeats * n ** 3 / (time.perf_counter() - t0) / 1e9


def macs_per_decode_step(cfg, rows: int) -> float:
    """Multiply-adds of one decode step of `rows` requests at the run's mean context: every weight of
    the attention and dense parts once per row, the row's k routed experts, attention's q.k and p.v
    over the keys, the LM head."""
    per_row = sum(s.attn_params + s.dense_ffn_params + cfg.num_experts_per_tok * s.expert_params
                  + (2 * MEAN_KEYS * cfg.num_heads * cfg.head_dim if s.kv_elems_per_token else 0)
                  for s in layer_shapes(cfg))
    return rows * float(per_row + cfg.vocab_size * cfg.hidden_size)


def bytes_per_decode_step(cfg, rows: int, distinct_experts: np.ndarray) -> dict:
    """What one decode step of `rows` requests must read, at the run's mean context: every row's K and
    V in every layer, each layer's attention and dense weights and the routed experts it activated
    (distinct_experts [L]), the LM head."""
    shapes = layer_shapes(cfg)
    kv = rows * MEAN_KEYS * sum(cfg.kv_elems_per_token(i) for i in range(cfg.num_layers)) * cfg.dtype_bytes
    weights = sum(s.attn_params + s.dense_ffn_params + n * s.expert_params for s, n in zip(shapes, distinct_experts))
    weights = (weights + cfg.vocab_size * cfg.hidden_size) * cfg.dtype_bytes
    return {"kv": kv, "weights": float(weights), "total": kv + float(weights)}


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
    # the layer's caches donated, as in the model's programs (else every call copies them whole)
    attend = jax.jit(lambda x, kv, meta: layer.attend(x, kv, meta, model.placements.attention), donate_argnums=1)
    attention = jax.jit(partial(paged_attention, scale=cfg.head_dim ** -0.5))

    def program():  # K steps of the whole model; the caches are donated and replaced in kv
        return decode_steps(model, token_ids, kv, meta, num_steps, max_steps, sampler, *rest)

    _, (_, activated) = program()  # experts activated per layer, summed over the steps
    compiled = model._fns[("decode_steps", sampler, max_steps, kernels.backend_for())]  # the program run above
    hlo = compiled.lower(model._param_leaves, kv, token_ids, meta, num_steps, *rest).compile().as_text()
    inside = traced_split(program, hlo, int(num_steps))
    needed = bytes_per_decode_step(cfg, R, np.asarray(activated) / int(num_steps))

    def fused_layer():
        out, kv[0], counts = model.layer(0, x, kv[0], meta)
        return out

    def attention_block():
        out, kv[0] = attend(x, kv[0], meta)
        return out
    k_cache, v_cache = kv[0]
    parts = {
        "decode step of the whole model (in the multi-step program)": per_call_ms(program) / int(num_steps),
        "one layer, fused": per_call_ms(fused_layer),
        "one layer: attention block": per_call_ms(attention_block),
        "one layer: paged attention alone": per_call_ms(lambda: attention(
            q, kv[0][0], kv[0][1], meta.positions, meta.seq_ids, meta.block_tables, meta.num_kv_blocks)),
    }
    bandwidth = {"1 thread": stream_read_gbps(1), "2 threads": stream_read_gbps(2)}
    floor_ms = needed["total"] / bandwidth["2 threads"] / 1e6
    macs, rate = macs_per_decode_step(cfg, R), gemm_gmacs()
    step_ms = min(run_ahead[True])
    return {"batch": batch, "decode_rows": R, "num_kv_blocks": int(meta.num_kv_blocks),
            "iterations": llm.last_stats["iterations"], "ms_per_decode_step": wall / NEW_TOKENS * 1e3,
            "split_ms_per_decode_step": split, "part_ms_per_call": parts,
            "program_ms_per_decode_step_by_kind": inside,
            "run_ahead_ms_per_decode_step": {"off": min(run_ahead[False]), "on": step_ms},
            "memory_floor": {"bytes_per_decode_step": needed, "stream_read_GBps": bandwidth,
                             "floor_ms_per_decode_step": floor_ms, "floor_over_step": floor_ms / step_ms},
            "compute_floor": {"macs_per_decode_step": macs, "gemm_GMACps": rate,
                              "floor_ms_per_decode_step": macs / rate / 1e6, "floor_over_step": macs / rate / 1e6 / step_ms}}


def kernel_ablation(batch: int, repeats: int = 3) -> dict:
    """ms per generated token (LLM.generate's time over NEW_TOKENS, prefill included) of engines that
    differ in one native kernel, traced that way at their first call: as is, without paged attention
    (q passed through), with it run twice per layer (the second call reads the KV the first just
    brought into cache), without the routed experts (rows passed through). Alternating, best of
    `repeats`. Outputs differ (the kernels are skipped); the times say what each kernel costs inside
    the program, where its KV and weights come from memory, not cache."""
    attention, experts = native.paged_attention, native.moe_ffn

    def attention_twice(*args, scale, window=None):
        first = attention(*args, scale=scale, window=window)  # a different scale: no common subexpression
        return first + 1e-9 * attention(*args, scale=scale * 1.001, window=window)
    variants = {
        "as is": (attention, experts),
        "without paged attention": (lambda q, *_, scale, window=None: q.astype(jnp.float32) * scale, experts),
        "paged attention twice": (attention_twice, experts),
        "without routed experts": (attention, lambda x, slots, w, w_gate_up, *_: (
            x.astype(jnp.float32) * w[:, :1], jnp.zeros((w_gate_up.shape[0],), jnp.int32))),
    }
    params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    llms = {}
    try:
        for name, kernel_pair in variants.items():
            native.paged_attention, native.moe_ffn = kernel_pair  # what this engine's programs trace
            llms[name] = LLM(str(CKPT), max_model_len=PROMPT_LEN + NEW_TOKENS, max_num_seqs=batch)
            llms[name].generate(prompts(512, batch), params)  # compiles with this variant
    finally:
        native.paged_attention, native.moe_ffn = attention, experts
    times = {name: [] for name in llms}
    for _ in range(repeats):
        for name, llm in llms.items():
            t0 = time.perf_counter()
            llm.generate(prompts(512, batch), params)
            times[name].append((time.perf_counter() - t0) / NEW_TOKENS * 1e3)
    return {name: min(t) for name, t in times.items()}


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
        r["kernel_ablation_ms_per_token"] = kernel_ablation(batch)
        print(f"batch {batch}: {r['ms_per_decode_step']:.2f} ms per decode step ({r['iterations']} iterations)")
        ahead = r["run_ahead_ms_per_decode_step"]
        print(f"  run-ahead off / on: {ahead['off']:.3f} / {ahead['on']:.3f} ms per decode step")
        for name, ms in {**r["split_ms_per_decode_step"], **r["part_ms_per_call"]}.items():
            print(f"  {name:60s} {ms:7.3f} ms")
        for name, ms in r["program_ms_per_decode_step_by_kind"].items():
            print(f"  in the program: {name:46s} {ms:7.3f} ms")
        for name, ms in r["kernel_ablation_ms_per_token"].items():
            print(f"  engine {name:53s} {ms:7.3f} ms per token")
        floor = r["memory_floor"]
        print(f"  memory floor: {floor['bytes_per_decode_step']['total'] / 1e6:.1f} MB per step at "
              f"{floor['stream_read_GBps']['2 threads']:.1f} GB/s = {floor['floor_ms_per_decode_step']:.3f} ms "
              f"({floor['floor_over_step']:.2f} of the step)")
        floor = r["compute_floor"]
        print(f"  compute floor: {floor['macs_per_decode_step'] / 1e6:.1f} M multiply-adds per step at "
              f"{floor['gemm_GMACps']:.1f} G/s = {floor['floor_ms_per_decode_step']:.3f} ms "
              f"({floor['floor_over_step']:.2f} of the step)")
    write_json(__file__, load_average_1min=os.getloadavg()[0], prompt_len=PROMPT_LEN, new_tokens=NEW_TOKENS,
               max_decode_steps=llm.engine.executor.max_decode_steps, batches=rows)


if __name__ == "__main__":
    main()
