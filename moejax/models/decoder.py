"""The decoder: pre-norm layers (attention -- grouped-query, or DeepSeek's multi-head latent attention --
then MoE or dense feed-forward) and the causal-LM wrapper.

A layer is four steps, so that executors can run the routed experts elsewhere:

    h, kv       = layer.attend(x, kv, meta, placement)   x + attn(norm(x)), this step's K/V (or state) written
    y, w, ids   = layer.route(h, valid)                  y = norm(h), top-k (None in a dense layer)
    routed      = routed_experts(y, ids, w, buffer...)   on whatever expert buffer the executor holds
    x'          = layer.combine(h, y, routed)            h + routed + shared expert(y)   (dense: h + mlp(y))

The routed experts' weights are not in the layer: they live in CausalLM.experts[i]. The token mixer
`attn` is attention over the paged KV cache, or Gated DeltaNet linear attention over per-request
state slots in the layers `cfg.linear_layers` marks (Qwen3-Next).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import kernels
from moejax.config import ModelConfig
from moejax.meshes.placement import Placement
from moejax.models.attention import Attention, AttentionMetadata, LayerCache, LayerKV
from moejax.models.gated_deltanet import GatedDeltaNet
from moejax.models.layers import RMSNorm, SwiGLU, init_normal, param
from moejax.models.mla import MultiHeadLatentAttention
from moejax.models.moe import RoutedExperts, Router


def attention_class(cfg: ModelConfig, layer: int) -> type[Attention | MultiHeadLatentAttention | GatedDeltaNet]:
    """`layer`'s token mixer: Gated DeltaNet where linear_layers marks it, else MLA or GQA attention."""
    if cfg.linear_layers[layer]:
        return GatedDeltaNet
    return Attention if cfg.mla is None else MultiHeadLatentAttention


def cache_layout(cfg: ModelConfig, layer: int) -> LayerCache:
    """What `layer`'s token mixer keeps in the KV cache (per token, or per request)."""
    return attention_class(cfg, layer).cache_layout(cfg, layer)


def cache_layouts(cfg: ModelConfig) -> list[LayerCache]:
    """What each layer's token mixer keeps in the KV cache."""
    return [cache_layout(cfg, i) for i in range(cfg.num_layers)]


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, dtype, rngs: nnx.Rngs):
        D, zero_centered = cfg.hidden_size, cfg.zero_centered_norm
        self.input_norm = RMSNorm(D, cfg.rms_norm_eps, dtype, rngs, zero_centered=zero_centered)
        self.attn = attention_class(cfg, layer)(cfg, layer, dtype, rngs)
        self.post_attn_norm = RMSNorm(D, cfg.rms_norm_eps, dtype, rngs, zero_centered=zero_centered)
        moe = cfg.moe_layers[layer]
        self.router = Router(cfg, dtype, rngs) if moe else None
        self.mlp = None if moe else SwiGLU(D, cfg.dense_intermediate_size, dtype, rngs)
        self.shared_expert = SwiGLU(D, cfg.shared_expert_intermediate_size, dtype, rngs) \
            if moe and cfg.shared_expert_intermediate_size else None
        self.shared_gate = param(init_normal(rngs, (D, 1), D, dtype), "embed", None) \
            if moe and cfg.shared_expert_gate else None  # [D, 1]: sigmoid(y @ w) scales the shared expert

    def attend(self, x: jax.Array, kv: LayerKV, meta: AttentionMetadata,
               placement: Placement | None) -> tuple[jax.Array, LayerKV]:
        """x: [T, D] -> (h = x + attention [T, D], layer KV with this step's K/V written)."""
        out, kv = self.attn(self.input_norm(x), kv, meta, placement)
        return x + out, kv

    def route(self, h: jax.Array, valid: jax.Array):
        """h: [T, D] -> (y = norm(h) [T, D], weights [T, K] fp32, expert ids [T, K] (E: padding row));
        weights and ids are None in a dense layer."""
        y = self.post_attn_norm(h)
        if self.router is None:
            return y, None, None
        return (y, *self.router(y, valid))

    def combine(self, h: jax.Array, y: jax.Array, routed: jax.Array | None) -> jax.Array:
        """The layer's output: h + routed experts + shared expert (MoE), or h + mlp(y) (dense)."""
        if self.router is None:
            return h + self.mlp(y)
        if self.shared_expert is not None:
            shared = self.shared_expert(y)
            if self.shared_gate is not None:
                shared = jax.nn.sigmoid(kernels.dense(y, self.shared_gate[...])) * shared
            routed = routed + shared
        return h + routed


class TokenIO(nnx.Module):
    """Token embedding in, final norm and LM head out: the parts of the model outside the layers."""

    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        D, V = cfg.hidden_size, cfg.vocab_size
        self.embed = param(init_normal(rngs, (V, D), 1, dtype), "vocab", "embed")  # [V, D]
        self.final_norm = RMSNorm(D, cfg.rms_norm_eps, dtype, rngs, zero_centered=cfg.zero_centered_norm)
        self.lm_head = None if cfg.tie_word_embeddings else param(
            init_normal(rngs, (D, V), D, dtype), "embed", "vocab")  # [D, V]

    def embed_tokens(self, token_ids: jax.Array) -> jax.Array:
        """token_ids: [T] -> [T, D]."""
        return jnp.take(self.embed[...], token_ids, axis=0)

    def logits(self, x: jax.Array) -> jax.Array:
        """x: [T, D] final hidden -> [T, V] fp32 logits."""
        h = self.final_norm(x)
        if self.lm_head is None:  # tied: XLA's dot reads the embedding transposed (dense would copy it)
            return jnp.dot(h, self.embed[...].T, preferred_element_type=jnp.float32)
        return kernels.dense(h, self.lm_head[...], preferred_element_type=jnp.float32)


class CausalLM(nnx.Module):
    """Every supported architecture: TokenIO around decoder layers; experts[i] holds MoE layer i's
    routed experts (None for a dense layer)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, dtype=None):
        dtype = dtype or jnp.dtype(cfg.dtype)
        self.io = TokenIO(cfg, dtype, rngs)
        self.layers = nnx.List([DecoderLayer(cfg, i, dtype, rngs) for i in range(cfg.num_layers)])
        self.experts = nnx.List([RoutedExperts(cfg, dtype, rngs) if moe else None for moe in cfg.moe_layers])
