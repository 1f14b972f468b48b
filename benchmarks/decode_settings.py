"""Decode settings side by side in the engine: the defaults against each one changed alone, on the
checkpoint and prompts of decode_vs_hf.py (run that first: it writes the checkpoint). Each round runs
every variant's LLM.generate once, in an order that rotates per round; a variant's time ratio is the
median over rounds of its time over the default's in the same round (the VM's speed drifts between
rounds by more than most of these differences).

    max_decode_steps=16        the multi-step program's most steps (default 32)
    parallel_min=2097152       MOEJAX_NATIVE_PARALLEL_MIN: the fewest multiply-adds a native kernel
                               call spreads over the thread pool (default 524288)
    lax.top_k                  the routers' top-k as jax.lax.top_k instead of the native kernel

Greedy sampling's argmax (kernels.argmax) is traced once per process (sampling.sample is jitted on its
own), so it is compared apart: kernels.top_k / argmax against lax.top_k / jnp.argmax at this model's
router and sampling shapes, LOOP calls in one compiled loop, per call.

    .venv/bin/python benchmarks/decode_settings.py    # -> benchmarks/decode_settings.json
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time

import jax
import jax.numpy as jnp
from decode_vs_hf import CKPT, NEW_TOKENS, PROMPT_LEN, prompts, write_json

from moejax import LLM, SamplingParams, kernels
from moejax.engine.jax_executor import MAX_DECODE_STEPS


@contextlib.contextmanager
def lax_top_k():
    """Programs traced inside route with jax.lax.top_k."""
    native = kernels.top_k
    kernels.top_k = jax.lax.top_k
    try:
        yield
    finally:
        kernels.top_k = native


# name: (engine options, environment while it runs, context its programs trace in)
VARIANTS = {
    "default": ({}, {}, contextlib.nullcontext),
    "max_decode_steps=16": ({"max_decode_steps": 16}, {}, contextlib.nullcontext),
    "parallel_min=2097152": ({}, {"MOEJAX_NATIVE_PARALLEL_MIN": "2097152"}, contextlib.nullcontext),
    "lax.top_k": ({}, {}, lax_top_k),
}


@contextlib.contextmanager
def environment(values: dict[str, str]):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v


def measure(batch: int, rounds: int) -> dict:
    params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    batch_prompts = prompts(512, batch)
    llms, tokens = {}, {}
    for name, (options, env, trace) in VARIANTS.items():
        shared = next((llms[n] for n, v in VARIANTS.items() if n in llms and v[0] == options and v[2] is trace), None)
        llm = llms[name] = shared or LLM(str(CKPT), max_model_len=PROMPT_LEN + NEW_TOKENS, max_num_seqs=batch,
                                         **options)
        with trace(), environment(env):  # programs trace at the first call; the second warms up
            tokens[name] = [o.token_ids for o in llm.generate(batch_prompts, params)]
            llm.generate(batch_prompts, params)
    names = list(VARIANTS)
    seconds = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            with environment(VARIANTS[name][1]):
                t0 = time.perf_counter()
                llms[name].generate(batch_prompts, params)
                seconds[name].append(time.perf_counter() - t0)
    ratios = {name: statistics.median(t / d for t, d in zip(seconds[name], seconds["default"])) for name in names}
    return {"batch": batch, "best_seconds": {n: min(t) for n, t in seconds.items()},
            "median_time_ratio_vs_default": ratios, "round_seconds": seconds,
            "greedy_tokens_identical_to_default": {n: tokens[n] == tokens["default"] for n in names}}


LOOP = 200


def per_call_us(op, x: jax.Array, repeats: int = 30) -> float:
    """Microseconds per call of op(x) -> int32 indices, LOOP calls in one program (each input depends on
    the last output, so none is hoisted), best of `repeats`."""
    def body(_, carry):
        return op(x + carry[..., None].astype(x.dtype) * 0)

    loop = jax.jit(lambda x: jax.lax.fori_loop(0, LOOP, body, op(x)))
    loop(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        loop(x).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return best / LOOP * 1e6


def kernel_rows(batches: list[int]) -> list[dict]:
    """kernels.top_k (the router: 16 experts, top 4) and kernels.argmax (sampling: 512 logits) against
    XLA's, at each batch's rows."""
    rows = []
    for batch in batches:
        router = jax.random.normal(jax.random.key(batch), (batch, 16), jnp.float32)
        logits = jax.random.normal(jax.random.key(batch + 1), (batch, 512), jnp.float32)
        rows.append({"rows": batch, "router_top_4_of_16_us": {
                         "lax.top_k": per_call_us(lambda x: jax.lax.top_k(x, 4)[1].sum(axis=-1), router),
                         "kernels.top_k": per_call_us(lambda x: kernels.top_k(x, 4)[1].sum(axis=-1), router)},
                     "argmax_of_512_us": {
                         "jnp.argmax": per_call_us(lambda x: jnp.argmax(x, axis=-1).astype(jnp.int32), logits),
                         "kernels.argmax": per_call_us(kernels.argmax, logits)}})
        print(f"rows {batch:4d}: " + "; ".join(f"{k}: " + ", ".join(f"{n} {v:.1f} us" for n, v in d.items())
                                              for k, d in rows[-1].items() if k != "rows"), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 256])
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args()
    load_before = os.getloadavg()[0]
    kernels_side = kernel_rows(args.batches)
    rows = []
    for batch in args.batches:
        rows.append(measure(batch, args.rounds))
        print(f"batch {batch:4d}: " + ", ".join(f"{n} x{r:.3f}" for n, r in rows[-1]["median_time_ratio_vs_default"].items()
                                               if n != "default")
              + f" (time over default's); greedy identical: {all(rows[-1]['greedy_tokens_identical_to_default'].values())}",
              flush=True)
    write_json(__file__, load_average_1min={"before": load_before, "after": os.getloadavg()[0]}, prompt_len=PROMPT_LEN,
               new_tokens=NEW_TOKENS, rounds=args.rounds, default_max_decode_steps=MAX_DECODE_STEPS, batches=rows,
               kernels=kernels_side)


if __name__ == "__main__":
    main()
