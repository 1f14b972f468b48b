"""The public entry points for backends that compute on tiles (`tile_map.py`).

A tiled backend supplies three things (a `TileKernels`): its block sizes for a problem (tile height
included), a grouped matmul over tiles and a fused gated expert FFN over tiles (the gate/up bias of
biased experts added in its epilogue). This module does the rest the
same way for all of them: place rows into tiles, run the kernel, and gather results back -- so the
kernels themselves only ever see whole tiles of one expert each.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from . import tile_map
from .permute import sort_by_expert

# Shape classes key every tuned block-size table; they depend on rows per expert, which decides
# whether a grouped GEMM is weight-streaming (decode) or compute-bound (prefill).
SHAPE_CLASSES = ("decode", "mixed", "prefill")


def shape_class(num_rows: int, num_groups: int) -> str:
    """'decode' (< 8 rows per expert), 'mixed' (< 64) or 'prefill'."""
    per_group = num_rows / max(num_groups, 1)
    return "decode" if per_group < 8 else "mixed" if per_group < 64 else "prefill"


@dataclass(frozen=True)
class TileKernels:
    """What a tiled backend implements. Shapes: P = tiles * block_m rows, G local experts.

    config(num_rows, num_groups, D, F, dtype) -> block sizes for this problem; `.block_m` is the tile height
    gmm(x [P, K], w [G, K, N], tiles, config, out_dtype) -> [P, N]
    ffn(x [P, D], w_gate_up [G, D, 2F], w_down [G, F, D], tiles, config, activation, out_dtype,
        b_gate_up [G, 2F] or None) -> [P, D]
    unsupported(D, F, dtype) -> None, or why this backend cannot run the shape (dispatch falls back)

    Rows of inactive tiles (index >= tiles.active) may be left unwritten; they are never read back.
    """

    config: Callable[..., Any]
    gmm: Callable[..., jax.Array]
    ffn: Callable[..., jax.Array]
    unsupported: Callable[..., str | None] = lambda D, F, dtype: None


class Backend:
    """grouped_matmul / expert_ffn / moe_ffn (the backend interface `moejax.kernels` dispatches to)
    on top of a backend's tile kernels."""

    def __init__(self, kernels: TileKernels):
        self.kernels = kernels
        self.unsupported = kernels.unsupported

    def _tiles(self, group_sizes, num_rows, D, F, dtype):
        cfg = self.kernels.config(num_rows, group_sizes.shape[0], D, F, jnp.dtype(dtype))
        return (cfg, *tile_map.tile_rows(group_sizes, num_rows, cfg.block_m))

    def _on_tiles(self, x, group_sizes, F, run):
        """Rows x: [R, K] sorted by group -> tiles -> run(x_tiled, tiles, cfg) -> back to [R, N]."""
        cfg, tiles, buffer_row, num_buffer_rows = self._tiles(group_sizes, x.shape[0], x.shape[1], F, x.dtype)
        y_tiled = run(tile_map.gather_rows(x, tile_map.source_rows(buffer_row, num_buffer_rows)), tiles, cfg)
        return tile_map.gather_rows(y_tiled, buffer_row)

    def grouped_matmul(self, x, w, group_sizes):
        """x: [R, K] sorted by group, w: [G, K, N] -> [R, N] fp32 (rows of no group: zeros)."""
        return self._on_tiles(x, group_sizes, w.shape[2],
                              lambda xt, tiles, cfg: self.kernels.gmm(xt, w, tiles, cfg, jnp.float32))

    def expert_ffn(self, x_sorted, w_gate_up, w_down, group_sizes, activation, b_gate_up=None):
        """x_sorted: [R, D] -> [R, D] fp32 (rows of no group: zeros)."""
        return self._on_tiles(x_sorted, group_sizes, w_down.shape[1],
                              lambda xt, tiles, cfg: self.kernels.ffn(xt, w_gate_up, w_down, tiles, cfg,
                                                                      activation, jnp.float32, b_gate_up))

    def moe_ffn(self, x, slot_ids, topk_weights, w_gate_up, w_down, activation, b_gate_up=None):
        """x: [T, D], slot_ids: [T, K] (G = no slot) -> ([T, D] fp32, rows per slot [G]).

        Tokens are gathered straight into the tiled buffer and expert outputs gathered straight
        back per (token, slot): no [T*K, D] sorted copy and no dense [T, E] tensor.
        """
        (T, K), D = slot_ids.shape, x.shape[1]
        order, group_sizes = sort_by_expert(slot_ids, w_gate_up.shape[0])
        cfg, tiles, row_sorted, num_buffer_rows = self._tiles(group_sizes, T * K, D, w_down.shape[1], x.dtype)
        buffer_row = jnp.zeros((T * K,), jnp.int32).at[order].set(row_sorted)  # [T*K] in (token, k) order
        x_tiled = tile_map.gather_rows(x, tile_map.source_rows(row_sorted, num_buffer_rows, order // K))
        # Expert outputs in the input dtype: half the bytes for bf16; the k-sum below is fp32.
        y_tiled = self.kernels.ffn(x_tiled, w_gate_up, w_down, tiles, cfg, activation, x.dtype, b_gate_up)
        y = tile_map.gather_rows(y_tiled, buffer_row).reshape(T, K, D).astype(jnp.float32)
        return jnp.einsum("tkd,tk->td", y, topk_weights.astype(jnp.float32)), group_sizes
