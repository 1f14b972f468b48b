"""Where the CPU backend's routed experts switch from the native kernel to the tile loop: both timed
side by side (alternating, best of REPEATS) on prefill-sized problems of growing expert size, float32.
Sets kernels/cpu.py's NATIVE_EXPERT_WEIGHTS (below it the native kernel runs at every row count).

    .venv/bin/python benchmarks/moe_cpu_native_threshold.py    # -> benchmarks/moe_cpu_native_threshold.json
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from moejax import kernels
from moejax.kernels import cpu

REPEATS = 5
# (tokens T, hidden D, expert hidden F, experts E, top-k K)
PROBLEMS = [(512, 128, 64, 16, 4), (2048, 128, 64, 16, 4), (8192, 128, 64, 16, 4), (2048, 256, 128, 16, 4),
            (8192, 256, 128, 16, 4), (1024, 512, 256, 32, 4), (2048, 512, 256, 16, 4), (8192, 512, 256, 16, 4),
            (512, 1024, 512, 32, 4), (2048, 1024, 512, 32, 4), (1024, 2048, 768, 64, 8), (2048, 2048, 768, 64, 8)]


def compiled(native: bool, *args):
    """moe_ffn on the cpu backend with its native kernel forced on or off (the choice is made at trace time)."""
    saved = cpu.PREFILL_ROWS, cpu.NATIVE_EXPERT_WEIGHTS
    cpu.PREFILL_ROWS, cpu.NATIVE_EXPERT_WEIGHTS = (1 << 40, 1 << 40) if native else (0, 0)
    try:
        return jax.jit(lambda *a: kernels.moe_ffn(*a, backend="cpu")[0]).lower(*args).compile()
    finally:
        cpu.PREFILL_ROWS, cpu.NATIVE_EXPERT_WEIGHTS = saved


def main() -> None:
    rng = np.random.default_rng(0)
    rows = []
    for T, D, F, E, K in PROBLEMS:
        args = (jnp.asarray(rng.normal(size=(T, D)), jnp.float32),
                jnp.asarray(np.argsort(rng.random((T, E)), axis=1)[:, :K], jnp.int32),
                jnp.asarray(rng.random((T, K)), jnp.float32),
                jnp.asarray(rng.normal(size=(E, D, 2 * F)) / np.sqrt(D), jnp.float32),
                jnp.asarray(rng.normal(size=(E, F, D)) / np.sqrt(F), jnp.float32))
        fns = {"native": compiled(True, *args), "tile_loop": compiled(False, *args)}
        outs = {name: np.asarray(f(*args)) for name, f in fns.items()}
        times = {name: [] for name in fns}
        for _ in range(REPEATS):
            for name, f in fns.items():
                t0 = time.perf_counter()
                f(*args).block_until_ready()
                times[name].append(time.perf_counter() - t0)
        best = {name: min(t) * 1e3 for name, t in times.items()}
        rows.append({"T": T, "D": D, "F": F, "E": E, "K": K, "rows_per_expert": T * K // E,
                     "weights_per_expert": 3 * D * F, "ms": best,
                     "native_over_tile_loop": best["native"] / best["tile_loop"],
                     "max_abs_difference": float(np.abs(outs["native"] - outs["tile_loop"]).max())})
        r = rows[-1]
        print(f"T={T:5d} D={D:5d} F={F:4d} E={E:3d} K={K} ({r['rows_per_expert']:5d} rows/expert, "
              f"{r['weights_per_expert']:8d} weights/expert): native {best['native']:8.2f} ms, tile loop "
              f"{best['tile_loop']:8.2f} ms, ratio {r['native_over_tile_loop']:.2f}", flush=True)
    out = {"machine": f"{platform.machine()} CPU, {os.cpu_count()} cores (no accelerator)",
           "load_average_1min": os.getloadavg()[0], "dtype": "float32", "repeats": REPEATS,
           "native_expert_weights": cpu.NATIVE_EXPERT_WEIGHTS, "problems": rows}
    path = Path(__file__).with_suffix(".json")
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
