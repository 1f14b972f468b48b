"""`moejax bench kernels`: the routed-expert layer per kernel backend, against the roofline measured
in the same run and against peer grouped-GEMM kernels; a rich table plus JSON.

    python -m moejax.kernels.benchmark [--json PATH] [--quick]      (or: moejax bench kernels ...)
    python -m moejax.kernels.benchmark --tune                         (GPU: sweep mosaic_gpu blocks)

Problems: Mixtral-8x7B (D 4096, F 14336, E 8, k 2), Qwen3-30B-A3B (2048, 768, 128, 8) and
DeepSeek-V3 (7168, 2048, 256, 8; experts sliced to fit memory), each prefill-like (T = 2K..16K
tokens) and decode-like (T = 8..256), bf16, uniformly random top-k routing. On a CPU, D and F are
divided by 4 and T is smaller.

Every contender computes the same thing, `moe_ffn`: tokens + top-k ids -> combined expert output.
Our backends run `moejax.kernels.moe_ffn(backend=...)`; the peers -- `jax.lax.ragged_dot` (our
"reference" backend), JAX's `ragged_dot_mgpu`, tokamax's `ragged_dot` -- run as the grouped GEMM of
the reference path (permute -> GEMM -> SwiGLU -> GEMM -> combine).

    FLOPs    = 6 T k D F (routed rows; no padding)
    bytes    = weights of the experts that received rows + x read + output written
    roofline = max(FLOPs / matmul peak, bytes / copy bandwidth) / time, with both peaks measured in
               this run: a large dense bf16 matmul, and a device-to-device streaming copy.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from . import moe_ffn, mosaic_gpu, platform_backend, tiled
from .permute import permute, sort_by_expert, unpermute_combine

MODELS = {"mixtral-8x7b": (4096, 14336, 8, 2), "qwen3-30b-a3b": (2048, 768, 128, 8),
          "deepseek-v3": (7168, 2048, 256, 8)}  # D, F, E, k
TOKENS = {"prefill": (2048, 4096, 8192, 16384), "decode": (8, 32, 128, 256)}
QUICK_TOKENS = {"prefill": (4096,), "decode": (8, 128)}
CPU_SCALE = 4  # D and F divided by this on a CPU
CPU_TOKENS = {"prefill": (256,), "decode": (8, 64)}
CPU_QUICK_TOKENS = {"prefill": (128,), "decode": (8,)}
DTYPE = jnp.bfloat16
# Peer kernels by family; a family's time on a problem is its best member's. "reference" is our
# jax.lax.ragged_dot backend; ragged_dot_mgpu runs with a decode- and a prefill-friendly tile.
PEERS = {"ragged_dot": ("reference",), "ragged_dot_mgpu": ("ragged_dot_mgpu/m64", "ragged_dot_mgpu/m128"),
         "tokamax": ("tokamax",)}


@dataclasses.dataclass(frozen=True)
class Problem:
    model: str
    phase: str
    tokens: int
    D: int
    F: int
    E: int  # experts held (sliced to fit memory)
    k: int

    @property
    def flops(self) -> float:
        return 6.0 * self.tokens * self.k * self.D * self.F


def problems(platform: str, quick: bool) -> list[Problem]:
    cpu = platform == "cpu"
    tokens = (CPU_QUICK_TOKENS if quick else CPU_TOKENS) if cpu else (QUICK_TOKENS if quick else TOKENS)
    budget = _memory_bytes() * 0.3  # for one layer's expert weights
    out = []
    for model, (D, F, E, k) in MODELS.items():
        if cpu:
            D, F = D // CPU_SCALE, F // CPU_SCALE
        E = min(E, max(k, int(budget // (3 * D * F * jnp.dtype(DTYPE).itemsize))))
        out += [Problem(model, phase, T, D, F, E, k) for phase, ts in tokens.items() for T in ts]
    return out


def _memory_bytes() -> float:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("bytes_limit", 8 << 30)  # CPUs report none: assume 8 GiB usable


# ---- timing and the measured roofline ---------------------------------------------------------

def _seconds(fn: Callable, *args, reps: int = 5) -> tuple[float, object]:
    """Device time of fn(*args): the median of CUPTI kernel times on a GPU; elsewhere the fastest
    wall-clock run (on a shared CPU the least disturbed). Compiles and warms up first; calls slower
    than a second are timed once. Returns (seconds, fn's output)."""
    fn = jax.jit(fn)
    out = jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - start
    reps = 1 if first > 1.0 else reps
    if jax.default_backend() == "gpu":
        from jax.experimental.mosaic.gpu import profiler
        _, ms = profiler.measure(fn, iterations=reps)(*args)
        return statistics.median(ms) / 1e3, out
    times = [first]
    for _ in range(reps - 1):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return min(times), out


def measure_roofline(platform: str) -> dict:
    """Dense bf16 matmul rate and streaming copy bandwidth of this device, measured now."""
    n = 2048 if platform == "cpu" else 8192
    a, b = (jax.random.normal(jax.random.key(i), (n, n), DTYPE) for i in range(2))
    matmul_s, _ = _seconds(jnp.dot, a, b)
    words = (256 << 20 if platform == "cpu" else 2 << 30) // 4
    x = jnp.zeros((words // 4096, 4096), jnp.uint32)
    copy_s, _ = _seconds(lambda x: x + 1, x)  # one read and one write per word; integer: cheap everywhere
    return {"matmul_tflops": 2 * n**3 / matmul_s / 1e12, "matmul_shape": [n, n, n],
            "copy_gbps": 2 * x.nbytes / copy_s / 1e9, "copy_bytes": x.nbytes}


# ---- contenders -------------------------------------------------------------------------------

MoE = Callable[..., jax.Array]  # (x, ids, weights, w_gate_up, w_down) -> out [T, D]


def _ours(name: str) -> MoE:
    return lambda x, ids, wts, wgu, wd: moe_ffn(x, ids, wts, wgu, wd, backend=name)[0]


def _via_grouped_gemm(gmm: Callable) -> MoE:
    """The reference moe path with `gmm(x_sorted [R, K], w [E, K, N], group_sizes) -> [R, N]` inside."""
    def moe(x, ids, weights, w_gate_up, w_down):
        order, group_sizes = sort_by_expert(ids, w_gate_up.shape[0])
        gate, up = jnp.split(gmm(permute(x, order, ids.shape[1]), w_gate_up, group_sizes).astype(jnp.float32), 2, -1)
        y = gmm((jax.nn.silu(gate) * up).astype(x.dtype), w_down, group_sizes)
        return unpermute_combine(y, order, weights).astype(x.dtype)
    return moe


def _ragged_dot_mgpu(block_m: int) -> MoE:
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu
    return _via_grouped_gemm(lambda x, w, sizes: ragged_dot_mgpu.ragged_dot(
        x, w, group_sizes=sizes, block_m=block_m, block_n=128, block_k=64, max_concurrent_steps=4,
        grid_block_n=1))


def _tokamax() -> MoE:
    import tokamax
    return _via_grouped_gemm(lambda x, w, sizes: tokamax.ragged_dot(x, w, sizes))


def contenders(platform: str) -> dict[str, MoE]:
    """What runs on this platform: our native backend(s), the reference, and importable peers."""
    out = {"reference": _ours("reference")}
    # Interpreted backends (pallas off-TPU, mosaic_gpu off-GPU) would time their interpreter.
    if platform_backend() != "reference":
        out[platform_backend()] = _ours(platform_backend())
    if platform_backend() == "mosaic_gpu":
        out |= {f"ragged_dot_mgpu/m{bm}": _ragged_dot_mgpu(bm) for bm in (64, 128)}
    try:
        out["tokamax"] = _tokamax()
    except ImportError:
        pass
    return out


# ---- one problem -------------------------------------------------------------------------------

def inputs(p: Problem, seed: int = 0):
    """x [T, D], top-k ids/weights [T, k] (uniform routing), w_gate_up [E, D, 2F], w_down [E, F, D]."""
    kx, kr, kw, kg, kd = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(kx, (p.tokens, p.D), DTYPE)
    weights, ids = jax.lax.top_k(jax.random.uniform(kr, (p.tokens, p.E)), p.k)
    weights = jax.nn.softmax(jax.random.normal(kw, weights.shape), axis=-1)
    w_gate_up = (jax.random.normal(kg, (p.E, p.D, 2 * p.F), DTYPE) / np.sqrt(p.D)).astype(DTYPE)
    w_down = (jax.random.normal(kd, (p.E, p.F, p.D), DTYPE) / np.sqrt(p.F)).astype(DTYPE)
    return x, ids.astype(jnp.int32), weights, w_gate_up, w_down


def measure(p: Problem, fns: dict[str, MoE], roof: dict) -> list[dict]:
    args = inputs(p)
    active = int(np.unique(np.asarray(args[1])).size)
    itemsize = jnp.dtype(DTYPE).itemsize
    weight_bytes = active * 3 * p.D * p.F * itemsize
    moved = weight_bytes + 2 * p.tokens * p.D * itemsize
    compute_s, memory_s = p.flops / (roof["matmul_tflops"] * 1e12), moved / (roof["copy_gbps"] * 1e9)
    rows, want = [], None
    for name, fn in fns.items():  # "reference" first: every other output is checked against it
        row = {**dataclasses.asdict(p), "backend": name, "active_experts": active}
        try:
            s, out = _seconds(fn, *args)
        except Exception as e:  # a peer that cannot run a shape must not end the run
            rows.append(row | {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"})
            continue
        out = np.asarray(out, np.float32)
        want = out if want is None else want
        row["max_rel_err"] = float(np.abs(out - want).max() / max(np.abs(want).max(), 1e-30))
        if not row["max_rel_err"] < 2e-2:  # bf16 tolerance; NaN fails too
            row["error"] = f"wrong result: max relative error {row['max_rel_err']:.2e} vs reference"
        rows.append(row | {"ms": s * 1e3, "tflops": p.flops / s / 1e12, "gbps": moved / s / 1e9,
                           "weight_gbps": weight_bytes / s / 1e9, "roofline": max(compute_s, memory_s) / s,
                           "bound": "compute" if compute_s > memory_s else "memory"})
    times = {r["backend"]: r["ms"] for r in rows if "error" not in r}
    for r in rows:
        if "error" not in r and not any(r["backend"] in members for members in PEERS.values()):
            r["speedup"] = {family: min(times[m] for m in members if m in times) / r["ms"]
                            for family, members in PEERS.items() if any(m in times for m in members)}
    return rows


# ---- the command ---------------------------------------------------------------------------------

def run(json_path: str | None = None, *, quick: bool = False) -> dict:
    """Benchmark every contender on this machine's problems; print a table; write JSON if asked."""
    from rich.console import Console

    platform, load = jax.default_backend(), os.getloadavg()[0]  # others' load skews CPU timings
    console = Console(width=None if Console().is_terminal else 150)  # full rows in logs
    device = jax.devices()[0]
    console.print(f"[bold]kernels benchmark[/bold] on {device.device_kind} ({platform}), jax {jax.__version__}")
    roof = measure_roofline(platform)
    console.print(f"measured peaks: dense bf16 matmul {roof['matmul_tflops']:.2f} TFLOP/s, "
                  f"copy {roof['copy_gbps']:.1f} GB/s")
    fns = contenders(platform)
    results = []
    for p in problems(platform, quick):
        rows = measure(p, fns, roof)
        results += rows
        console.print(f"  {p.model} {p.phase} T={p.tokens}: " + ", ".join(
            f"{r['backend']} {r['ms']:.2f} ms" + (" [red]WRONG[/red]" if "error" in r else "") if "ms" in r
            else f"{r['backend']} [red]failed[/red]" for r in rows))
    report = {"device": device.device_kind, "platform": platform, "jax": jax.__version__,
              "host_cpus": os.cpu_count(), "load_average_1min": load,
              "num_devices": jax.device_count(), "quick": quick, "dtype": jnp.dtype(DTYPE).name,
              "roofline": roof, "contenders": list(fns), "results": results}
    console.print(table(report))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=1)
        console.print(f"wrote {json_path}")
    return report


def table(report: dict):
    from rich.table import Table

    peers = [f for f, members in PEERS.items() if any(m in report["contenders"] for m in members)]
    t = Table(title=f"moe_ffn, {report['dtype']}, {report['device']} -- roofline: "
                    f"{report['roofline']['matmul_tflops']:.1f} TFLOP/s, {report['roofline']['copy_gbps']:.0f} GB/s")
    for col in ["model (E held)", "phase", "T", "backend", "ms", "TFLOP/s", "GB/s", "% roofline",
                *(f"vs {p}" for p in peers)]:
        t.add_column(col, justify="left" if col in ("model (E held)", "phase", "backend") else "right")
    last = None
    for r in report["results"]:
        key = (r["model"], r["phase"], r["tokens"])
        first = [f"{r['model']} ({r['E']})", r["phase"], str(r["tokens"])] if key != last else ["", "", ""]
        if last is not None and key != last:
            t.add_section()
        last = key
        if "error" in r:
            t.add_row(*first, r["backend"], r["error"][:60], *[""] * (3 + len(peers)))
            continue
        vs = [f"{r['speedup'][p]:.2f}x" if p in r.get("speedup", {}) else "" for p in peers]
        t.add_row(*first, r["backend"], f"{r['ms']:.3f}", f"{r['tflops']:.2f}", f"{r['gbps']:.1f}",
                  f"{100 * r['roofline']:.0f}% {r['bound'][0]}", *vs)
    return t


# ---- block-size sweep (GPU) -------------------------------------------------------------------------

TUNE_SPACE = {"decode": dict(block_n=(128, 256), steps=(3, 4, 5), grid_minor=(0, 1)),
              "mixed": dict(block_n=(128, 256), steps=(3, 4), grid_minor=(0, 1)),
              "prefill": dict(block_n=(128, 256), steps=(3, 4), grid_width=(4, 8, 16))}


def tune(quick: bool = True) -> dict:
    """Time mosaic_gpu with variations of each shape class's table entry and print the configs with
    the least total time over the class's problems (paste them into mosaic_gpu.BLOCKS). Variants
    that do not fit in SMEM are skipped."""
    if platform_backend() != "mosaic_gpu":
        raise SystemExit("--tune sweeps the Hopper kernels: it needs an H100/H200")
    kernels = mosaic_gpu.backend.kernels
    times: dict[tuple[str, mosaic_gpu.Config], list[float]] = {}
    per_class: dict[str, int] = {}
    for p in problems("gpu", quick):
        rows, args = p.tokens * p.k, inputs(p)
        cls = tiled.shape_class(rows, p.E)
        per_class[cls] = per_class.get(cls, 0) + 1
        base = kernels.config(rows, p.E, p.D, p.F, DTYPE)
        space = TUNE_SPACE[cls]
        for values in itertools.product(*space.values()):
            cfg = dataclasses.replace(base, **dict(zip(space, values)))
            fixed = tiled.Backend(dataclasses.replace(kernels, config=lambda *_, cfg=cfg: cfg))
            try:
                s, _ = _seconds(lambda *a, b=fixed: b.moe_ffn(*a, "silu")[0], *args)
            except ValueError as e:  # e.g. "Mosaic GPU kernel exceeds available shared memory"
                print(f"{p.model} {p.phase} T={p.tokens} {dict(zip(space, values))}: skipped ({str(e)[:80]})")
                continue
            print(f"{p.model} {p.phase} T={p.tokens} {dict(zip(space, values))}: {s * 1e3:.3f} ms")
            times.setdefault((cls, cfg), []).append(s)
    best: dict[str, tuple[float, mosaic_gpu.Config]] = {}
    for (cls, cfg), ts in times.items():
        if len(ts) == per_class[cls] and sum(ts) < best.get(cls, (float("inf"),))[0]:
            best[cls] = (sum(ts), cfg)
    for cls, (_, cfg) in best.items():
        print(f"best {cls}: {cfg}")
    return {cls: dataclasses.asdict(cfg) for cls, (_, cfg) in best.items()}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--quick", action="store_true", help="fewer token counts per model")
    parser.add_argument("--tune", action="store_true", help="sweep mosaic_gpu block sizes (GPU only)")


def main(args: argparse.Namespace) -> int:
    if args.tune:
        tune(quick=args.quick)
    else:
        run(args.json, quick=args.quick)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m moejax.kernels.benchmark", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    raise SystemExit(main(parser.parse_args()))
