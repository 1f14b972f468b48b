"""Multi-head latent attention (DeepSeek-V2/V3, arXiv 2405.04434) over a paged cache of latents.

    q               = x @ w_q                    or  norm(x @ w_q_a) @ w_q_b          (q LoRA)   [T, H, nope + rope]
    latent, k_rope  = norm(x @ w_kv_a[:, :r]),   x @ w_kv_a[:, r:]                              [T, r], [T, rope]
    rope            on q's last `rope` dims and on k_rope (one key shared by every head)
    head h          key (latent @ W_uk[h], k_rope), value latent @ W_uv[h]    (w_kv_b = [W_uk | W_uv] per head)

The cache keeps only latent and k_rope per token (r + rope elements, not 2 H head_dim): that is
MLA's point. Attention runs over it through moejax.kernels.paged_latent_attention, which decompresses
the keys (naive) or folds W_uk / W_uv into the query and output (absorbed), whichever is cheaper.
"""

from __future__ import annotations

import math

import jax
from flax import nnx

from moejax import kernels
from moejax.config import ModelConfig
from moejax.meshes import sharded_ops
from moejax.meshes.placement import Placement
from moejax.models.attention import AttentionMetadata, CacheArray, LayerCache, LayerKV
from moejax.models.layers import RMSNorm, Rope, init_normal, param

LORA_NORM_EPS = 1e-6  # transformers' q_a_layernorm / kv_a_layernorm keep RMSNorm's default, not rms_norm_eps


def softmax_scale(cfg: ModelConfig) -> float:
    """1/sqrt(q/k head width), times YaRN's mscale(factor, mscale_all_dim)^2 when the rope is scaled:
    DeepSeek's correction for the longer context."""
    scale = cfg.mla.qk_head_dim ** -0.5
    rope = cfg.rope
    if rope.kind != "default" and rope.mscale_all_dim and rope.factor > 1:
        scale *= (0.1 * rope.mscale_all_dim * math.log(rope.factor) + 1.0) ** 2
    return scale


class MultiHeadLatentAttention(nnx.Module):
    @staticmethod
    def cache_layout(cfg: ModelConfig, layer: int) -> LayerCache:
        """Per token: the kv latent [r] and the rope key [rope], shared by all heads (whole on every head shard)."""
        m = cfg.mla
        return LayerCache("latent", (CacheArray("latent", (m.kv_lora_rank,), (None,)),
                                     CacheArray("k_rope", (m.qk_rope_head_dim,), (None,))))

    def __init__(self, cfg: ModelConfig, layer: int, dtype, rngs: nnx.Rngs):
        m = cfg.mla
        D, H, qk, r = cfg.hidden_size, cfg.num_heads, m.qk_head_dim, m.kv_lora_rank
        self.num_heads, self.nope, self.r, self.v_head_dim = H, m.qk_nope_head_dim, r, m.v_head_dim
        if m.q_lora_rank is None:
            self.w_q = param(init_normal(rngs, (D, H * qk), D, dtype), "embed", "q_heads")  # [D, H*(nope+rope)]
            self.w_q_a = self.q_a_norm = self.w_q_b = None
        else:
            self.w_q = None
            self.w_q_a = param(init_normal(rngs, (D, m.q_lora_rank), D, dtype), "embed", None)  # [D, q_lora]
            self.q_a_norm = RMSNorm(m.q_lora_rank, LORA_NORM_EPS, dtype, rngs)
            self.w_q_b = param(init_normal(rngs, (m.q_lora_rank, H * qk), m.q_lora_rank, dtype), None, "q_heads")
        self.w_kv_a = param(init_normal(rngs, (D, r + m.qk_rope_head_dim), D, dtype), "embed", None)  # latent | k_rope
        self.kv_a_norm = RMSNorm(r, LORA_NORM_EPS, dtype, rngs)
        # [r, H*(nope+v)]: per head its key up-projection W_uk [r, nope], then its value one W_uv [r, v]
        self.w_kv_b = param(init_normal(rngs, (r, H * (m.qk_nope_head_dim + m.v_head_dim)), r, dtype), None, "q_heads")
        self.w_o = param(init_normal(rngs, (H * m.v_head_dim, D), H * m.v_head_dim, dtype), "q_heads", "embed")
        self.rope = Rope.from_config(cfg, dim=m.qk_rope_head_dim, interleaved=m.rope_interleave)
        self.scale = softmax_scale(cfg)
        self.cache_axes = tuple(("batch", None, *a.axes) for a in self.cache_layout(cfg, layer).arrays)

    def __call__(self, x: jax.Array, kv: LayerKV, meta: AttentionMetadata,
                 placement: Placement | None) -> tuple[jax.Array, LayerKV]:
        """x: [T, D] (normed hidden) -> ([T, D], (latent cache, rope-key cache) with this step's rows written)."""
        T, H, nope, r = x.shape[0], self.num_heads, self.nope, self.r
        q, kv_a = kernels.dense(x, (self.w_q if self.w_q is not None else self.w_q_a)[...], self.w_kv_a[...])
        if self.w_q is None:  # q LoRA
            q = kernels.dense(self.q_a_norm(q), self.w_q_b[...])
        q = q.reshape(T, H, -1)
        latent, k_rope = self.kv_a_norm(kv_a[:, :r]), kv_a[:, r:]
        q_rope = self.rope(q[..., nope:], meta.positions)
        k_rope = self.rope(k_rope[:, None], meta.positions)[:, 0]
        w_kv_b = self.w_kv_b[...].reshape(r, H, nope + self.v_head_dim)
        heads, rows = ("batch", "q_heads", None), ("batch", None)
        per_head = (None, "q_heads", None)
        out, *caches = sharded_ops.paged(
            placement, self._attend, (q[..., :nope], q_rope, latent, k_rope, w_kv_b[..., :nope], w_kv_b[..., nope:]),
            (heads, heads, rows, rows, per_head, per_head), tuple(kv), self.cache_axes, heads,
            (meta.positions, meta.slot_mapping, meta.seq_ids, meta.block_tables, meta.num_kv_blocks))
        return kernels.dense(out.reshape(T, H * self.v_head_dim), self.w_o[...]), tuple(caches)

    def _attend(self, q_nope, q_rope, latent, k_rope, w_uk, w_uv, latent_cache, rope_cache, positions, slot_mapping,
                seq_ids, block_tables, num_kv_blocks):
        """Write this step's latents and rope keys into the paged cache, then attend over it."""
        latent_cache = kernels.write_rows(latent_cache, latent, slot_mapping)
        rope_cache = kernels.write_rows(rope_cache, k_rope, slot_mapping)
        out = kernels.paged_latent_attention(q_nope, q_rope, latent_cache, rope_cache, w_uk, w_uv, positions, seq_ids,
                                             block_tables, num_kv_blocks, scale=self.scale)
        return out, latent_cache, rope_cache
