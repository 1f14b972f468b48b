"""How the CPU backend was chosen: candidate CPU implementations of `moe_ffn`, timed side by side.

    .venv/bin/python benchmarks/kernels_cpu_alternatives.py [--json PATH] [--tokens 8 64 512]

Candidates (all compute the same routed SwiGLU experts; checked against the reference first):
  ragged_dot      the reference backend (XLA:CPU expands ragged_dot densely over all groups)
  dense           every expert on every token, combine weights zero for unrouted pairs (E x FLOPs)
  tiles/bm        the tiled layout + a loop over active tiles (what `cpu` runs) at tile height bm
  tiles/32/f32    the same, each tile's rows and expert weights upcast to fp32 inside the loop
  native          the native XLA:CPU kernel (kernels/native/moe_ffn.cc)
  cpu (table)     the cpu backend: native below cpu.PREFILL_ROWS rows per expert or on small experts
                  (cpu.NATIVE_EXPERT_WEIGHTS), else the tile loop
                  with its tuned tile height (cpu.BLOCK_M by shape class)
The chosen `cpu.BLOCK_M` table, the native kernel's range and the results are in benchmarks/kernels.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from moejax.kernels import cpu, moe_ffn, native, tiled
from moejax.kernels.benchmark import CPU_SCALE, MODELS, Problem, inputs


def dense(x, ids, weights, w_gate_up, w_down):
    T, E = x.shape[0], w_gate_up.shape[0]
    combine = jnp.zeros((T, E), jnp.float32).at[jnp.arange(T)[:, None], ids].add(weights)
    gate, up = jnp.split(jnp.einsum("td,edf->etf", x, w_gate_up, preferred_element_type=jnp.float32), 2, -1)
    y = jnp.einsum("etf,efd->etd", (jax.nn.silu(gate) * up).astype(x.dtype), w_down,
                   preferred_element_type=jnp.float32)
    return jnp.einsum("etd,te->td", y, combine).astype(x.dtype)


def tiles(block_m: int, upcast: bool = False):
    """The cpu backend at a fixed tile height; upcast: each tile's expert weights cast to fp32."""
    def ffn_f32(x, w_gate_up, w_down, tiles_, cfg, activation, out_dtype, b_gate_up=None):
        def expert(rows, e):
            rows, w1, w2 = rows.astype(jnp.float32), w_gate_up[e].astype(jnp.float32), w_down[e].astype(jnp.float32)
            gate, up = jnp.split(rows @ w1, 2, axis=-1)
            return (jax.nn.silu(gate) * up) @ w2
        return cpu._tile_loop(x, tiles_, cfg.block_m, w_down.shape[2], out_dtype, expert)

    kernels = dataclasses.replace(cpu.backend.kernels, config=lambda *_: cpu.Config(block_m),
                                  **({"ffn": ffn_f32} if upcast else {}))
    backend = tiled.Backend(kernels)
    return lambda x, ids, wts, wgu, wd: backend.moe_ffn(x, ids, wts, wgu, wd, "silu")[0].astype(x.dtype)


def candidates(num_experts: int, tokens: int) -> dict:
    out = {"ragged_dot": lambda *a: moe_ffn(*a, backend="reference")[0]}
    if num_experts * tokens <= 8 * 512:  # E x the FLOPs: only where that is still small
        out["dense"] = dense
    for bm in (8, 16, 32, 64, 128):
        out[f"tiles/{bm}"] = tiles(bm)
    out["tiles/32/f32"] = tiles(32, upcast=True)
    out["native"] = lambda x, ids, wts, wgu, wd: native.moe_ffn(x, ids, wts, wgu, wd, "silu")[0].astype(x.dtype)
    out["cpu (table)"] = lambda *a: moe_ffn(*a, backend="cpu")[0]
    return out


def seconds(fn, *args, reps=5) -> float:
    """Fastest of `reps` runs: on a shared machine the minimum is the least disturbed estimate."""
    fn = jax.jit(fn)
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--tokens", type=int, nargs="+", default=[8, 64, 512], help="T per model (< 512: decode)")
    args = parser.parse_args()
    results, load = [], os.getloadavg()[0]
    print(f"load average at start: {load:.1f} on {os.cpu_count()} CPUs")
    for model, (D, F, E, k) in MODELS.items():
        for T in args.tokens:
            p = Problem(model, "decode" if T < 512 else "prefill", T, D // CPU_SCALE, F // CPU_SCALE,
                        min(E, 64), k)  # DeepSeek-V3 sliced to 64 experts to fit 2 cores' patience
            problem = inputs(p)
            want = np.asarray(moe_ffn(*problem, backend="reference")[0], np.float32)
            row = {**dataclasses.asdict(p)}
            for name, fn in candidates(p.E, T).items():
                got = np.asarray(jax.jit(fn)(*problem), np.float32)
                assert np.abs(got - want).max() <= 2e-2 * np.abs(want).max(), name
                row[name] = seconds(fn, *problem) * 1e3
            results.append(row)
            best = min((v, n) for n, v in row.items() if isinstance(v, float))
            print(f"{model} T={T}: " + ", ".join(f"{n} {v:.1f} ms" for n, v in row.items() if isinstance(v, float))
                  + f"  -> best {best[1]}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": jax.devices()[0].device_kind, "cpus": os.cpu_count(), "load_average_1min": load,
                       "ms": results}, f, indent=1)


if __name__ == "__main__":
    main()
