"""Grouped-query attention over a paged KV cache, with the q/k-norm, bias, clipping, output-gate,
sliding-window and attention-sink variants; the per-iteration metadata every token mixer reads; what
a token mixer keeps in the cache, per token or per request (`LayerCache`, declared by each class)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import kernels
from moejax.config import ModelConfig
from moejax.meshes import sharded_ops
from moejax.meshes.placement import Placement
from moejax.models.layers import RMSNorm, Rope, init_normal, param

if TYPE_CHECKING:
    from moejax.models.gated_deltanet import RecurrentMetadata

# a layer's paged cache arrays, each [num_blocks, block_size, ...] (LayerCache); a Gated DeltaNet
# layer's: its state slots (conv, recurrent), each [num_slots, ...]
LayerKV = tuple[jax.Array, ...]


@dataclass(frozen=True)
class CacheArray:
    """One array of a layer's cache: `shape` per token (or per request), its dims named by logical `axes`."""

    name: str
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    dtype: str | None = None  # None: the model's dtype


@dataclass(frozen=True)
class LayerCache:
    """What one layer's token mixer keeps in the cache: per token, arrays [blocks, block_size, *shape],
    or per_request (a Gated DeltaNet layer's fixed-size state), arrays [state_slots, *shape]; in this
    order (the layer's LayerKV). `kind` names the layout in KV hand-off payloads."""

    kind: str
    arrays: tuple[CacheArray, ...]
    per_request: bool = False

    @property
    def elems_per_token(self) -> int:
        return 0 if self.per_request else sum(math.prod(a.shape) for a in self.arrays)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class AttentionMetadata:
    """Where each token row sits: built once per iteration (per row set) and shared by all layers.

    T is the padded row count; padding rows have valid=False and a slot past the cache end.

    A window-aware cache (moejax.engine.kv_cache.kv_groups) gives the layers of a sliding window
    their own blocks: `window_slots` / `window_tables` hold, per window, that group's slot mapping
    and block tables; layers whose window has none use `slot_mapping` / `block_tables`.
    """

    positions: jax.Array  # [T] int32: position of the row in its sequence
    slot_mapping: jax.Array  # [T] int32: flat KV slot the row's K/V goes to
    seq_ids: jax.Array  # [T] int32: row of `block_tables` the token belongs to
    block_tables: jax.Array  # [S, max_blocks_per_seq] int32
    num_kv_blocks: jax.Array  # [] int32: KV blocks the longest row attends over
    valid: jax.Array  # [T] bool
    window_slots: dict[int, jax.Array] = field(default_factory=dict)  # window -> [T] int32
    window_tables: dict[int, jax.Array] = field(default_factory=dict)  # window -> [S, max_blocks_per_seq] int32
    recurrent: RecurrentMetadata | None = None  # rows of Gated DeltaNet layers and their state slots

    def replace(self, **kw) -> "AttentionMetadata":
        return dataclasses.replace(self, **kw)

    def kv_tables(self, window: int | None) -> tuple[jax.Array, jax.Array]:
        """(slot mapping [T], block tables [S, max_blocks]) of the layers with this window."""
        if window in self.window_tables:
            return self.window_slots[window], self.window_tables[window]
        return self.slot_mapping, self.block_tables

    def advance(self, steps: jax.Array, valid: jax.Array, block_size: int, num_slots: int) -> "AttentionMetadata":
        """The metadata of decode rows `steps` tokens further on (traced, for multi-step decode): every
        row one position later per step, its KV slot looked up in its block table (each window's in its
        own); rows no longer `valid` become padding (slot past the cache, position 0)."""
        positions = self.positions + steps

        def slots(tables):
            blocks = tables[self.seq_ids, jnp.minimum(positions // block_size, tables.shape[1] - 1)]
            return jnp.where(valid, blocks * block_size + positions % block_size, num_slots)

        return self.replace(
            positions=jnp.where(valid, positions, 0), valid=valid, slot_mapping=slots(self.block_tables),
            window_slots={w: slots(t) for w, t in self.window_tables.items()},
            num_kv_blocks=(jnp.max(jnp.where(valid, positions, 0)) // block_size + 1).astype(jnp.int32))


class Attention(nnx.Module):
    @staticmethod
    def cache_layout(cfg: ModelConfig, layer: int) -> LayerCache:
        """Per token: K and V of every KV head (kind "window" for a sliding-window layer: a hand-off
        carries only its window)."""
        shape, axes = (cfg.num_kv_heads, cfg.head_dim), ("kv_heads", None)
        kind = "paged" if cfg.sliding_windows[layer] is None else "window"
        return LayerCache(kind, (CacheArray("k", shape, axes), CacheArray("v", shape, axes)))

    def __init__(self, cfg: ModelConfig, layer: int, dtype, rngs: nnx.Rngs):
        D, H, KV, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = H, KV, hd
        # Qwen3-Next: per head, [q | gate] side by side in w_q; out *= sigmoid(gate) before w_o
        self.output_gate = cfg.attn_output_gate
        q_width = H * hd * (2 if self.output_gate else 1)
        self.w_q = param(init_normal(rngs, (D, q_width), D, dtype), "embed", "q_heads")
        self.w_k = param(init_normal(rngs, (D, KV * hd), D, dtype), "embed", "kv_heads")
        self.w_v = param(init_normal(rngs, (D, KV * hd), D, dtype), "embed", "kv_heads")
        self.w_o = param(init_normal(rngs, (H * hd, D), H * hd, dtype), "q_heads", "embed")
        if cfg.qkv_bias:
            self.b_q = param(init_normal(rngs, (q_width,), 16, dtype), "q_heads")
            self.b_k = param(init_normal(rngs, (KV * hd,), 16, dtype), "kv_heads")
            self.b_v = param(init_normal(rngs, (KV * hd,), 16, dtype), "kv_heads")
        self.b_o = param(init_normal(rngs, (D,), 16, dtype), "embed") if cfg.o_bias else None
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm == "per_head":  # Qwen3: one RMSNorm over head_dim, shared by heads
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps, dtype, rngs, zero_centered=cfg.zero_centered_norm)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps, dtype, rngs, zero_centered=cfg.zero_centered_norm)
        elif cfg.qk_norm == "full":  # OLMoE: over the whole q / k projection
            self.q_norm = RMSNorm(H * hd, cfg.rms_norm_eps, dtype, rngs, axis="q_heads")
            self.k_norm = RMSNorm(KV * hd, cfg.rms_norm_eps, dtype, rngs, axis="kv_heads")
        self.has_bias = cfg.qkv_bias
        self.clip_qkv = cfg.clip_qkv
        self.window = cfg.sliding_windows[layer]
        self.rope = Rope.from_config(cfg)
        # [H] GPT-OSS's sinks: a learned logit per head in the softmax denominator
        self.sinks = param(init_normal(rngs, (H,), 1, dtype), "q_heads") if cfg.attention_sinks else None

    def __call__(self, x: jax.Array, kv: LayerKV, meta: AttentionMetadata,
                 placement: Placement | None) -> tuple[jax.Array, LayerKV]:
        """x: [T, D] (normed hidden) -> ([T, D], updated layer KV); placement: where heads and KV live."""
        T = x.shape[0]
        q, k, v = kernels.dense(x, self.w_q[...], self.w_k[...], self.w_v[...])
        if self.has_bias:
            q, k, v = q + self.b_q[...], k + self.b_k[...], v + self.b_v[...]
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (jnp.clip(t, -self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        gate = None
        if self.output_gate:
            q, gate = jnp.split(q.reshape(T, self.num_heads, 2 * self.head_dim), 2, axis=-1)
        q = q.reshape(T, self.num_heads, self.head_dim)
        k = k.reshape(T, self.num_kv_heads, self.head_dim)
        v = v.reshape(T, self.num_kv_heads, self.head_dim)
        if self.qk_norm == "per_head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rope(q, meta.positions), self.rope(k, meta.positions)
        slot_mapping, block_tables = meta.kv_tables(self.window)
        head_params = () if self.sinks is None else (self.sinks[...],)
        out, k_cache, v_cache = sharded_ops.attention(
            placement, self._attend, q, k, v, *kv, meta.positions, slot_mapping, meta.seq_ids, block_tables,
            meta.num_kv_blocks, *head_params)
        out = out.reshape(T, -1)
        if gate is not None:
            out = out * jax.nn.sigmoid(gate.reshape(T, -1))
        out = kernels.dense(out, self.w_o[...])
        if self.b_o is not None:
            out = out + self.b_o[...]
        return out, (k_cache, v_cache)

    def _attend(self, q, k, v, k_cache, v_cache, positions, slot_mapping, seq_ids, block_tables, num_kv_blocks,
                sinks=None):
        """Write this step's K/V into the paged cache, then attend through the block tables."""
        k_cache, v_cache = kernels.write_kv(k_cache, v_cache, k, v, slot_mapping)
        out = kernels.paged_attention(q, k_cache, v_cache, positions, seq_ids, block_tables, num_kv_blocks,
                                      scale=self.head_dim ** -0.5, window=self.window, sinks=sinks)
        return out, k_cache, v_cache
