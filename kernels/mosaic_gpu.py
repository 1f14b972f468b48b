"""The Hopper backend: Pallas Mosaic GPU kernels (TMA pipelining, wgmma, warp specialisation) over
tiles (tile_map.py). On any other platform they run in Pallas' GPU interpret mode (for tests).

One persistent kernel shape serves both GEMMs of the expert FFN:

    gate_up: h[tile, cols]  = glu(x[tile] @ W_gate[e][:, cols] (+ b_gate[e][cols]),
                                  x[tile] @ W_up[e][:, cols] (+ b_up[e][cols]))
    down:    y[tile, cols]  = h[tile] @ W_down[e][:, cols]                 (also grouped_matmul)

Each CTA loops over work items (tile, column block) -- only over the *active* tiles, read from the
tile map at run time, so absent experts cost nothing and, since every tile holds one expert's rows
and nothing else, each work item streams exactly one expert's weight columns once. Per work item a
warp-specialised pipeline runs: one memory warpgroup issues TMA loads of x (bm, bk) and the weight
blocks (bk, cols) into a `steps`-deep SMEM ring; two compute warpgroups split the CTA tile (by rows
or columns) and issue wgmma into fp32 register accumulators -- two of them for gate_up, sharing
the x block -- then apply the epilogue in registers (biased experts: the bias columns, loaded straight
from GMEM, added to the accumulators first) and store through SMEM with TMA. Tiles are
whole (padding rows are real zero rows), so every TMA transfer has a static full shape.

Work items are ordered with `planar_snake` so that the CTAs running at once share weight blocks
(consecutive tiles of one expert) and x tiles in L2.

Differences from JAX's ragged_dot_mgpu (read, not copied): whole tiles of one expert instead of masking
group boundaries (no tile computed twice, no row-by-row store ladder), a dynamic work count instead
of a grid over all groups (decode with 8 of 256 experts active runs 8 tiles, not 256), warp
specialisation, and the SwiGLU fused into the gate/up GEMM.

Unverified without a GPU: performance, and anything only ptxas/the hardware checks. The tests
check the numerics in interpret mode and that every tuned config lowers (SMEM budget included).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from .tile_map import Tiles
from .reference import glu
from .tiled import Backend, TileKernels, shape_class


@dataclasses.dataclass(frozen=True)
class Config:
    block_m: int  # rows per tile = rows per CTA work item
    block_n: int  # accumulator columns per compute warpgroup, over all operands (register budget)
    split: str  # the two compute warpgroups split the CTA tile by "m" (rows; block_m 128) or "n"
    steps: int = 4  # pipeline depth: SMEM stages in flight
    block_k: int = 64  # contraction per stage (64 bf16 = one 128-byte swizzle row)
    grid_minor: int = 0  # planar_snake: bands run along tiles (0) or column blocks (1)
    grid_width: int = 8  # planar_snake band width
    epi_n: int = 64  # epilogue store width (columns per SMEM -> GMEM copy)
    num_sms: int = 132  # persistent CTAs (filled in from the device)
    interpret: bool = False  # GPU interpret mode (filled in: True off-GPU)


# By device kind and shape class. Educated starting points (not yet measured: no GPU was lent when
# they were written); `python -m moejax.kernels.benchmark --tune` sweeps them on a GPU.
# decode/mixed: 64-row tiles (bm = 64 is still far below the ridge point, so weight streaming rules),
# warpgroups split columns -> many small work items to keep 132 SMs streaming.
# prefill: 128-row tiles, warpgroups split rows, wide accumulators -> high wgmma utilisation.
_HOPPER = {
    "decode": Config(block_m=64, block_n=128, split="n", steps=4, grid_minor=1),
    "mixed": Config(block_m=64, block_n=128, split="n", steps=4, grid_minor=0),
    "prefill": Config(block_m=128, block_n=256, split="m", steps=4, grid_minor=0, grid_width=16),
}
BLOCKS = {"H100": _HOPPER, "H200": _HOPPER}
MIN_DIM = 128  # D and F must be multiples: 64-column wgmma per warpgroup, two warpgroups per CTA


def _device_blocks() -> dict[str, Config]:
    kind = jax.devices()[0].device_kind
    return next((table for name, table in BLOCKS.items() if name in kind), _HOPPER)


def config(num_rows: int, num_groups: int, D: int, F: int, dtype) -> Config:
    on_gpu = jax.default_backend() == "gpu"
    cfg = _device_blocks()[shape_class(num_rows, num_groups)]
    if on_gpu:
        return dataclasses.replace(cfg, num_sms=jax.devices()[0].core_count)
    return dataclasses.replace(cfg, num_sms=2, interpret=True)  # 2 simulated SMs keep tests quick


def unsupported(D: int, F: int, dtype) -> str | None:
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"wgmma kernels take bf16/fp16 inputs (got {jnp.dtype(dtype).name}; fp32 would be tf32)"
    if D % MIN_DIM or F % MIN_DIM:
        return f"D and F must be multiples of {MIN_DIM} (D = {D}, F = {F})"
    return None


def _swizzled(minor_elems: int, dtype) -> tuple:
    """SMEM transforms for a tile whose minor dimension holds minor_elems elements."""
    swizzle = plgpu.find_swizzle(minor_elems * jnp.dtype(dtype).itemsize * 8)
    return (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)),
            plgpu.SwizzleTransform(swizzle))


def _tiled_matmul(x, w, col_offsets: tuple[int, ...], n_out: int, tiles: Tiles, cfg: Config,
                  epilogue, out_dtype, bias=None):
    """out[tile, :n_out] = epilogue(*(x[tile] @ w[e][:, off : off + n_out] (+ bias[e][off : off + n_out])
    for off in col_offsets)).

    x: [P, K] tiled rows; w: [G, K, N]; bias: [G, N] or None -> [P, n_out]. One accumulator per
    column offset.
    """
    (P, K), dtype = x.shape, x.dtype
    num_ops, bm, bk = len(col_offsets), cfg.block_m, cfg.block_k
    wg_m = bm // 2 if cfg.split == "m" else bm  # rows per compute warpgroup
    bn = cfg.block_n // num_ops  # columns per accumulator per warpgroup
    while n_out % (bn * (2 if cfg.split == "n" else 1)):
        bn //= 2
    cta_n = bn * (2 if cfg.split == "n" else 1)
    epi_n = min(cfg.epi_n, bn)
    n_iters, k_iters = n_out // cta_n, K // bk
    x_transforms, w_transforms = _swizzled(bk, dtype), _swizzled(cta_n, dtype)

    def body(group_gmem, active_gmem, x_gmem, w_gmem, *refs):
        b_gmem, o_gmem = refs if bias is not None else (None, *refs)
        wg = lax.axis_index("wg")
        wg_rows = pl.ds(wg * wg_m, wg_m) if cfg.split == "m" else slice(None)
        wg_cols = pl.ds(wg * bn, bn) if cfg.split == "n" else slice(None)

        def mma(_, x_smem, *refs):  # refs: the weight blocks, then the carry (accumulators)
            *w_smems, carry = refs
            for acc, w_smem in zip(carry, w_smems):
                plgpu.wgmma(acc, x_smem.at[wg_rows], w_smem.at[:, wg_cols])
            plgpu.wgmma_wait(0)
            return carry

        def pipeline(compute_context):
            return plgpu.emit_pipeline_warp_specialized(
                mma, grid=(k_iters,), memory_registers=40, wg_axis="wg", num_compute_wgs=2,
                max_concurrent_steps=cfg.steps, compute_context=compute_context,
                in_specs=[plgpu.BlockSpec((bm, bk), lambda k: (0, k), transforms=x_transforms)]
                + [plgpu.BlockSpec((bk, cta_n), lambda k: (k, 0), transforms=w_transforms)] * num_ops)

        # biased: per compute warpgroup, its bias columns of each operand (fp32) and a TMA barrier each
        bias_scratch = {} if bias is None else dict(
            b_smem=plgpu.SMEM((2, num_ops, bn), jnp.float32), b_barriers=plgpu.Barrier(num_barriers=2 * num_ops))

        @functools.partial(
            pl.run_scoped,
            allocs=pipeline(lambda _: None).get_allocations(
                x_gmem, *[w_gmem.at[0, :, pl.ds(0, cta_n)]] * num_ops),
            out_smem=plgpu.SMEM((2, wg_m, epi_n), out_dtype, transforms=_swizzled(epi_n, out_dtype)),
            **bias_scratch, collective_axes="wg")
        def _(allocs, out_smem, b_smem=None, b_barriers=None):
            @plgpu.nd_loop((active_gmem[0] * n_iters,), collective_axes="sm")
            def _(loop):
                mi, ni = plgpu.planar_snake(loop.index[0], (active_gmem[0], n_iters), cfg.grid_minor,
                                            cfg.grid_width)
                rows, cols = pl.ds(mi * bm, bm), pl.ds(ni * cta_n, cta_n)
                expert_w = w_gmem.at[group_gmem[mi]]

                def compute_context(run_pipeline):
                    @functools.partial(
                        pl.run_scoped, accs=[plgpu.ACC((wg_m, bn), jnp.float32)] * num_ops)
                    def _(accs):
                        if b_gmem is not None:  # this warpgroup's bias columns, loaded while the GEMM runs
                            first = ni * cta_n + (wg * bn if cfg.split == "n" else 0)
                            for op, off in enumerate(col_offsets):
                                plgpu.copy_gmem_to_smem(b_gmem.at[group_gmem[mi], pl.ds(off + first, bn)],
                                                        b_smem.at[wg, op], b_barriers.at[wg * num_ops + op])
                        run_pipeline(tuple(accs))
                        parts = [acc[...] for acc in accs]
                        if b_gmem is not None:  # broadcast over the warpgroup's rows
                            for op in range(num_ops):
                                plgpu.barrier_wait(b_barriers.at[wg * num_ops + op])
                            parts = [part + lax.broadcast_in_dim(plgpu.load(
                                b_smem.at[wg, op], layout=plgpu.Layout.WGMMA.reduce(0)), (wg_m, bn), [1])
                                for op, part in enumerate(parts)]
                        out = epilogue(*parts).astype(out_dtype)
                        dst = o_gmem.at[rows, cols].at[wg_rows, wg_cols]
                        for c in range(bn // epi_n):
                            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # previous store read out
                            out_smem[wg] = out[:, c * epi_n:(c + 1) * epi_n]
                            plgpu.commit_smem()
                            plgpu.copy_smem_to_gmem(out_smem.at[wg], dst.at[:, pl.ds(c * epi_n, epi_n)])

                pipeline(compute_context)(
                    x_gmem.at[rows, :],
                    *[expert_w.at[:, pl.ds(off + ni * cta_n, cta_n)] for off in col_offsets],
                    allocations=allocs)

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    kernel = plgpu.kernel(
        body, out_type=jax.ShapeDtypeStruct((P, n_out), out_dtype),
        grid=(cfg.num_sms,), grid_names=("sm",), num_threads=3, thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=plgpu.InterpretGPUParams() if cfg.interpret else None)
    return kernel(tiles.group, tiles.active[None], x, w, *(() if bias is None else (bias,)))


def gmm(x, w, tiles: Tiles, cfg: Config, out_dtype):
    """x: [P, K] tiled rows, w: [G, K, N] -> [P, N] out_dtype."""
    return _tiled_matmul(x, w, (0,), w.shape[2], tiles, cfg, lambda acc: acc, out_dtype)


def gate_up(x, w_gate_up, tiles: Tiles, cfg: Config, activation, b_gate_up=None):
    """x: [P, D] tiled rows -> h = glu(x @ W_gate + b_gate, x @ W_up + b_up): [P, F] in x.dtype
    (one kernel; no bias when b_gate_up is None)."""
    F = w_gate_up.shape[2] // 2
    bias = None if b_gate_up is None else b_gate_up.astype(jnp.float32)
    return _tiled_matmul(x, w_gate_up, (0, F), F, tiles, cfg, glu(activation), x.dtype, bias)


def ffn(x, w_gate_up, w_down, tiles: Tiles, cfg: Config, activation, out_dtype, b_gate_up=None):
    """x: [P, D] tiled rows -> [P, D] out_dtype: the gate/up kernel, then the down GEMM."""
    return gmm(gate_up(x, w_gate_up, tiles, cfg, activation, b_gate_up), w_down, tiles, cfg, out_dtype)


backend = Backend(TileKernels(config=config, gmm=gmm, ffn=ffn, unsupported=unsupported))
