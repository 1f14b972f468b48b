"""The CPU backend: the native routed-experts kernel (native.py: `moe_ffn.cc`) at decode and mixed sizes,
else a loop over the active tiles only, one fused expert FFN per tile.

Each loop step slices one tile of rows and its expert's weights (a dynamic slice of the leading
axis) and runs gate/up GEMM (+ bias) -> gated activation -> down GEMM on it. The trip count is the traced number of
active tiles, so experts without rows cost nothing and decode reads each active expert's weights
once. bf16 stays bf16 into the dots (XLA:CPU then uses the CPU's bf16 matrix units where it has
them; upcasting each tile to fp32 measured 1.6-4.1x slower at the same tile height),
accumulating in fp32.

The native kernel runs whole MoE layers (`moe_ffn`) with fewer than PREFILL_ROWS rows per expert, where
the loop's per-tile weight copies, sorts and gathers cost more than the GEMMs, and at any size for
experts of up to NATIVE_EXPERT_WEIGHTS weights, whose dots are too small for the loop's per-tile
overhead to pay off; on bigger problems XLA's dots (spread over its threads) win. Grouped GEMMs and
expert FFNs on sorted rows always run the loop.

Chosen over `jax.lax.ragged_dot` (which XLA:CPU computes densely over every group), a dense
all-experts einsum and other tile heights by measurement: benchmarks/kernels.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from . import native
from .tile_map import Tiles
from .reference import glu
from .tiled import Backend, TileKernels, shape_class

# Tile height by shape class, measured on a 2-core Sapphire Rapids (benchmarks/kernels.md): small
# tiles for decode (padding rows cost real FLOPs on a CPU), big ones for prefill.
BLOCK_M = {"decode": 8, "mixed": 32, "prefill": 128}


@dataclass(frozen=True)
class Config:
    block_m: int


def config(num_rows: int, num_groups: int, D: int, F: int, dtype) -> Config:
    return Config(BLOCK_M[shape_class(num_rows, num_groups)])


def _tile_loop(x: jax.Array, tiles: Tiles, block_m: int, n_out: int, out_dtype, tile_fn) -> jax.Array:
    """out[tile] = tile_fn(x[tile rows], expert) for each active tile; x: [P, D] -> [P, n_out]."""
    def step(i, out):
        rows = jax.lax.dynamic_slice_in_dim(x, i * block_m, block_m)
        return jax.lax.dynamic_update_slice_in_dim(
            out, tile_fn(rows, tiles.group[i]).astype(out_dtype), i * block_m, 0)
    out = jnp.zeros((x.shape[0], n_out), out_dtype)
    return jax.lax.fori_loop(0, tiles.active, step, out)


def gmm(x, w, tiles: Tiles, cfg: Config, out_dtype):
    return _tile_loop(x, tiles, cfg.block_m, w.shape[2], out_dtype,
                      lambda rows, e: jnp.dot(rows, w[e], preferred_element_type=jnp.float32))


def ffn(x, w_gate_up, w_down, tiles: Tiles, cfg: Config, activation, out_dtype, b_gate_up=None):
    gated = glu(activation)

    def expert(rows, e):
        gate_up = jnp.dot(rows, w_gate_up[e], preferred_element_type=jnp.float32)
        if b_gate_up is not None:
            gate_up = gate_up + b_gate_up[e].astype(jnp.float32)
        gate, up = jnp.split(gate_up, 2, axis=-1)
        h = gated(gate, up).astype(rows.dtype)
        return jnp.dot(h, w_down[e], preferred_element_type=jnp.float32)

    return _tile_loop(x, tiles, cfg.block_m, w_down.shape[2], out_dtype, expert)


class CpuBackend(Backend):
    def moe_ffn(self, x, slot_ids, topk_weights, w_gate_up, w_down, activation, b_gate_up=None):
        if self.runs_native(x, slot_ids, w_gate_up, w_down):
            return native.moe_ffn(x, slot_ids, topk_weights, w_gate_up, w_down, activation, b_gate_up)
        return super().moe_ffn(x, slot_ids, topk_weights, w_gate_up, w_down, activation, b_gate_up)

    @staticmethod
    def runs_native(x, slot_ids, w_gate_up, w_down) -> bool:
        """Whether moe_ffn runs the native kernel on this problem (static: shapes and dtypes)."""
        same_dtype = x.dtype == w_gate_up.dtype == w_down.dtype and x.dtype in (jnp.float32, jnp.bfloat16)
        few_rows = slot_ids.size < PREFILL_ROWS * w_gate_up.shape[0]
        small_experts = w_gate_up[0].size + w_down[0].size <= NATIVE_EXPERT_WEIGHTS
        return (same_dtype and (few_rows or small_experts)
                and jax.default_backend() == "cpu" and native.available())


PREFILL_ROWS = 64  # rows per expert from which the tile loop's dots beat the native kernel on big experts
# Weights per expert (gate/up + down) up to which the native kernel beats the tile loop at every row
# count (benchmarks/moe_cpu_native_threshold.json: D = 128-512 native 0.37-0.87x the loop's time at
# 128-2048 rows per expert; D = 1024, F = 512 even at 256 rows, D = 2048 the loop ahead).
NATIVE_EXPERT_WEIGHTS = 1 << 19
backend = CpuBackend(TileKernels(config=config, gmm=gmm, ffn=ffn))
