"""MLA's two attention forms side by side on this CPU: absorbed (attend over the latent) vs naive
(decompress the attended keys and values), for decode rows and for a prompt chunk, at the per-layer
attention shapes of tiny-deepseek-v3 and DeepSeek-V2-Lite. Writes mla_forms_cpu.json next to itself.

    .venv/bin/python benchmarks/mla_forms_cpu.py [--repeats 5]

Each case runs both forms on the same inputs in one process, alternating, and reports the median
seconds and naive / absorbed; the multiply-add counts are those `naive_is_cheaper` compares (per
head, summed over the rows and keys the kernel visits).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from moejax.config import get_preset
from moejax.kernels.latent_attention import paged_latent_attention
from moejax.kernels.paged_attention import TILE

BLOCK_SIZE = 16
CASES = {  # name -> (rows per sequence, sequences, context of the last row)
    "decode-ctx128": (1, 4, 128),
    "decode-ctx512": (1, 4, 512),
    "prefill-256": (256, 1, 256),
}


def problem(preset: str, rows_per_seq: int, seqs: int, context: int, rng):
    m, H = get_preset(preset).mla, get_preset(preset).num_heads
    blocks_per_seq = -(-context // BLOCK_SIZE)
    nb = blocks_per_seq * seqs
    tables = rng.permutation(nb).reshape(seqs, blocks_per_seq).astype(np.int32)
    positions = np.concatenate([np.arange(context - rows_per_seq, context)] * seqs).astype(np.int32)
    seq_ids = np.repeat(np.arange(seqs), rows_per_seq).astype(np.int32)
    T = len(positions)
    arrays = dict(
        q_nope=rng.normal(size=(T, H, m.qk_nope_head_dim)), q_rope=rng.normal(size=(T, H, m.qk_rope_head_dim)),
        latent_cache=rng.normal(size=(nb, BLOCK_SIZE, m.kv_lora_rank)),
        rope_cache=rng.normal(size=(nb, BLOCK_SIZE, m.qk_rope_head_dim)),
        w_uk=rng.normal(size=(m.kv_lora_rank, H, m.qk_nope_head_dim)) / np.sqrt(m.kv_lora_rank),
        w_uv=rng.normal(size=(m.kv_lora_rank, H, m.v_head_dim)) / np.sqrt(m.kv_lora_rank))
    arrays = {k: jnp.asarray(v, jnp.float32) for k, v in arrays.items()}
    return arrays, positions, seq_ids, tables, np.int32(blocks_per_seq), m, H


def macs(m, H: int, rows_per_seq: int, seqs: int, context: int) -> dict:
    """Multiply-adds of each form as the kernel runs it: naive decompresses the keys a tile (or a
    decode row) reads once per tile (or row); absorbed adds each row's query / output projections."""
    r, up = m.kv_lora_rank, m.kv_lora_rank * H * (m.qk_nope_head_dim + m.v_head_dim)
    positions = np.arange(context - rows_per_seq, context)
    attended = int((positions + 1).sum()) * seqs
    if rows_per_seq == 1:
        decompressed = attended
    else:  # per tile: keys up to its last row's block
        last = positions[TILE - 1::TILE] if len(positions) % TILE == 0 else np.append(positions[TILE - 1::TILE], positions[-1])
        decompressed = int(((last // BLOCK_SIZE + 1) * BLOCK_SIZE).sum()) * seqs
    rows = rows_per_seq * seqs
    return {"naive": decompressed * up + attended * H * (m.qk_head_dim + m.v_head_dim),
            "absorbed": rows * up + attended * H * (2 * r + m.qk_rope_head_dim)}


def run(repeats: int) -> dict:
    rng = np.random.default_rng(0)
    results = []
    for preset in ("tiny-deepseek-v3", "deepseek-v2-lite"):
        for case, (rows_per_seq, seqs, context) in CASES.items():
            arrays, positions, seq_ids, tables, nblocks, m, H = problem(preset, rows_per_seq, seqs, context, rng)
            method = "rows" if rows_per_seq == 1 else "tiles"  # what method="auto" picks for these rows
            fns = {form: jax.jit(partial(paged_latent_attention, scale=m.qk_head_dim ** -0.5, form=form,
                                         method=method)) for form in ("absorbed", "naive")}
            args = (arrays["q_nope"], arrays["q_rope"], arrays["latent_cache"], arrays["rope_cache"], arrays["w_uk"],
                    arrays["w_uv"], positions, seq_ids, tables, nblocks)
            outs = {form: fn(*args).block_until_ready() for form, fn in fns.items()}  # compile
            times = {form: [] for form in fns}
            for _ in range(repeats):
                for form, fn in fns.items():
                    t0 = time.perf_counter()
                    fn(*args).block_until_ready()
                    times[form].append(time.perf_counter() - t0)
            median = {form: float(np.median(t)) for form, t in times.items()}
            counts = macs(m, H, rows_per_seq, seqs, context)
            results.append(dict(
                preset=preset, case=case, method=method, rows=rows_per_seq * seqs, context=context,
                heads=H, kv_lora_rank=m.kv_lora_rank, seconds=median, naive_over_absorbed=median["naive"] / median["absorbed"],
                macs=counts, macs_naive_over_absorbed=counts["naive"] / counts["absorbed"],
                max_abs_diff=float(jnp.max(jnp.abs(outs["naive"] - outs["absorbed"])))))
            print(f"{preset:18} {case:15} absorbed {median['absorbed'] * 1e3:8.2f} ms  naive {median['naive'] * 1e3:8.2f} ms"
                  f"  naive/absorbed {results[-1]['naive_over_absorbed']:.2f} (MACs {results[-1]['macs_naive_over_absorbed']:.2f})",
                  flush=True)
    return {"machine": {"node": platform.node(), "processor": platform.processor() or platform.machine(),
                        "cpu_count": os.cpu_count(), "load_average_1m": os.getloadavg()[0],
                        "jax": jax.__version__, "backend": jax.default_backend()},
            "block_size": BLOCK_SIZE, "tile_rows": TILE, "repeats": repeats, "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=str(Path(__file__).with_name("mla_forms_cpu.json")))
    args = parser.parse_args()
    out = run(args.repeats)
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
