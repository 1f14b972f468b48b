"""The portable Pallas backend: BlockSpec kernels over tiles (tile_map.py).

Compiles with Mosaic on TPU; on every other platform it runs with `interpret=True` (how CI tests it,
slowly). Two kernels, both with the tile index as the outer grid axis and the per-tile expert id
scalar-prefetched so the index maps can pick that expert's weight blocks:

    ffn: grid (tiles, F / bf)         x[tile] (bm, D) resident; per step the gate and up blocks
                                      (D, bf) (+ their bias blocks (1, bf) for biased experts), the
                                      gated activation, then the down block (bf, D) accumulates into
                                      a (bm, D) fp32 scratch. Gate/up/activation/down fully fused:
                                      the hidden activation never leaves VMEM.
    gmm: grid (tiles, N / bn, K / bk) a plain blocked matmul per tile (fp32 scratch accumulator).

Grid steps past the active tiles keep every block index of the last active step, so the pipeline
issues no copies for them (absent experts cost a few cycles of step overhead each) and their
output block is never written. That relies on steps running in order, so all grid axes are
"arbitrary" (no megacore split).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from .tile_map import Tiles
from .reference import glu
from .tiled import Backend, TileKernels, shape_class


@dataclass(frozen=True)
class Config:
    block_m: int  # rows per tile
    block_f: int  # FFN columns per fused-FFN step (a divisor of F, else all of F)
    block_n: int  # gmm output columns per step
    block_k: int  # gmm contraction per step
    interpret: bool = False  # filled in by `config`: True off-TPU


# Block sizes by platform and shape class. TPU entries are sized for v5e/v6e VMEM (128 MiB) but not
# yet measured on one; "interpret" entries are small so CPU tests cross block boundaries.
BLOCKS = {
    "tpu": {"decode": Config(16, 512, 512, 512), "mixed": Config(128, 512, 512, 512),
            "prefill": Config(256, 256, 512, 512)},
    "interpret": {"decode": Config(8, 128, 128, 128), "mixed": Config(16, 128, 128, 128),
                  "prefill": Config(32, 128, 128, 128)},
}
LANES = 128  # TPU minor block dims must be multiples of this (or the whole dimension)


def _on_tpu() -> bool:
    return jax.default_backend() == "tpu"


def config(num_rows: int, num_groups: int, D: int, F: int, dtype) -> Config:
    on_tpu = _on_tpu()
    cfg = BLOCKS["tpu" if on_tpu else "interpret"][shape_class(num_rows, num_groups)]
    return replace(cfg, interpret=not on_tpu)


def unsupported(D: int, F: int, dtype) -> str | None:
    if _on_tpu() and F % LANES:
        return f"the gate and up blocks of w_gate_up need F % {LANES} == 0 on TPU (F = {F})"
    return None


def _fit(block: int, dim: int) -> int:
    """The largest multiple of LANES <= block dividing dim, else the whole dim."""
    for b in range(min(block, dim) // LANES * LANES, 0, -LANES):
        if dim % b == 0:
            return b
    return dim


def _step(active_ref, i, *inner):
    """Block coordinates for grid step (i, *inner): steps past the active tiles repeat the last
    active step's coordinates. inner: (index, steps along that axis) pairs."""
    live = i < active_ref[0]
    tile = jnp.where(live, i, jnp.maximum(active_ref[0] - 1, 0))
    return (tile, *(jnp.where(live, j, n - 1) for j, n in inner))


def _params(grid_rank: int, *blocks: tuple[tuple[int, ...], jnp.dtype]) -> pltpu.CompilerParams:
    """All axes 'arbitrary' (see module doc); a VMEM limit fitting the double-buffered blocks."""
    need = sum(2 * jnp.dtype(dt).itemsize * math.prod(s) for s, dt in blocks)
    return pltpu.CompilerParams(dimension_semantics=("arbitrary",) * grid_rank,
                                vmem_limit_bytes=min(int(need * 1.25) + (8 << 20), 110 << 20))


def _accumulate(part, acc_ref, o_ref, step, num_steps):
    """Sum `part` over the reduction grid axis (at `step` of `num_steps`) in fp32 scratch; the last
    step writes the output block."""
    @pl.when(step == 0)
    def _():
        acc_ref[...] = part

    @pl.when(step > 0)
    def _():
        acc_ref[...] += part

    @pl.when(step == num_steps - 1)
    def _():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def _ffn_kernel(group_ref, active_ref, x_ref, w_gate_ref, w_up_ref, w_down_ref, *refs, gated, biased):
    b_gate_ref, b_up_ref, o_ref, acc_ref = refs if biased else (None, None, *refs)
    f = pl.program_id(1)

    @pl.when(pl.program_id(0) < active_ref[0])
    def _():
        x = x_ref[...]  # [bm, D]
        gate = jnp.dot(x, w_gate_ref[...], preferred_element_type=jnp.float32)  # [bm, bf]
        up = jnp.dot(x, w_up_ref[...], preferred_element_type=jnp.float32)
        if biased:  # [1, bf] blocks, broadcast over the tile's rows
            gate = gate + b_gate_ref[...].astype(jnp.float32)
            up = up + b_up_ref[...].astype(jnp.float32)
        h = gated(gate, up).astype(x.dtype)
        part = jnp.dot(h, w_down_ref[...], preferred_element_type=jnp.float32)  # [bm, D]
        _accumulate(part, acc_ref, o_ref, f, pl.num_programs(1))


def ffn(x, w_gate_up, w_down, tiles: Tiles, cfg: Config, activation, out_dtype, b_gate_up=None):
    """x: [P, D] tiled rows -> [P, D] out_dtype; b_gate_up: [G, 2F] or None."""
    (P, D), F = x.shape, w_down.shape[1]
    bm, bf = cfg.block_m, _fit(cfg.block_f, F)
    nf = F // bf
    biased = b_gate_up is not None

    def rows(i, f, group, active):
        return _step(active, i, (f, nf))[0], 0

    def gate(i, f, group, active):
        t, f = _step(active, i, (f, nf))
        return group[t], 0, f

    def up(i, f, group, active):
        t, f = _step(active, i, (f, nf))
        return group[t], 0, nf + f

    def down(i, f, group, active):
        t, f = _step(active, i, (f, nf))
        return group[t], f, 0

    w_block = (None, D, bf)
    in_specs = [pl.BlockSpec((bm, D), rows), pl.BlockSpec(w_block, gate),
                pl.BlockSpec(w_block, up), pl.BlockSpec((None, bf, D), down)]
    operands = [x, w_gate_up, w_gate_up, w_down]
    if biased:  # [G, 1, 2F]: the gate and up columns of a step are the same blocks' as the weights'
        bias = b_gate_up.reshape(b_gate_up.shape[0], 1, 2 * F)
        in_specs += [pl.BlockSpec((None, 1, bf), gate), pl.BlockSpec((None, 1, bf), up)]
        operands += [bias, bias]
    return pl.pallas_call(
        lambda *refs: _ffn_kernel(*refs, gated=glu(activation), biased=biased),
        out_shape=jax.ShapeDtypeStruct((P, D), out_dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(P // bm, nf),
            in_specs=in_specs,
            out_specs=pl.BlockSpec((bm, D), rows),
            scratch_shapes=[pltpu.VMEM((bm, D), jnp.float32)]),
        compiler_params=_params(2, ((bm, D), x.dtype), ((3, D, bf), w_down.dtype), ((bm, D), out_dtype),
                                ((bm, D), jnp.float32), ((2, 1, bf), w_down.dtype)),
        interpret=cfg.interpret,
    )(tiles.group, tiles.active[None], *operands)


def _gmm_kernel(group_ref, active_ref, x_ref, w_ref, o_ref, acc_ref):
    k = pl.program_id(2)

    @pl.when(pl.program_id(0) < active_ref[0])
    def _():
        part = jnp.dot(x_ref[...], w_ref[...], preferred_element_type=jnp.float32)
        _accumulate(part, acc_ref, o_ref, k, pl.num_programs(2))


def gmm(x, w, tiles: Tiles, cfg: Config, out_dtype):
    """x: [P, K] tiled rows, w: [G, K, N] -> [P, N] out_dtype."""
    (P, K), N = x.shape, w.shape[2]
    bm, bn, bk = cfg.block_m, _fit(cfg.block_n, N), _fit(cfg.block_k, K)
    nn, nk = N // bn, K // bk

    def lhs(i, n, k, group, active):
        t, _, k = _step(active, i, (n, nn), (k, nk))
        return t, k

    def rhs(i, n, k, group, active):
        t, n, k = _step(active, i, (n, nn), (k, nk))
        return group[t], k, n

    def out(i, n, k, group, active):
        t, n, _ = _step(active, i, (n, nn), (k, nk))
        return t, n

    return pl.pallas_call(
        _gmm_kernel,
        out_shape=jax.ShapeDtypeStruct((P, N), out_dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(P // bm, nn, nk),
            in_specs=[pl.BlockSpec((bm, bk), lhs), pl.BlockSpec((None, bk, bn), rhs)],
            out_specs=pl.BlockSpec((bm, bn), out),
            scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)]),
        compiler_params=_params(3, ((bm, bk), x.dtype), ((bk, bn), w.dtype), ((bm, bn), out_dtype),
                                ((bm, bn), jnp.float32)),
        interpret=cfg.interpret,
    )(tiles.group, tiles.active[None], x, w)


backend = Backend(TileKernels(config=config, gmm=gmm, ffn=ffn, unsupported=unsupported))
