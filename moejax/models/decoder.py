"""The decoder: pre-norm layers (attention, then MoE or dense feed-forward) and the causal-LM wrapper."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.config import ModelConfig
from moejax.models.attention import Attention, AttentionMetadata, LayerKV
from moejax.models.layers import RMSNorm, init_normal, param
from moejax.models.moe import DenseMLP, MoEBlock


class DecoderLayer(nnx.Module):
    """x -> x + attn(norm(x)) -> h + ffn(norm(h)). The two halves are separate methods because
    executors may place them apart (attention and experts on different devices)."""

    def __init__(self, cfg: ModelConfig, layer: int, dtype, rngs: nnx.Rngs):
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, rngs)
        self.attn = Attention(cfg, layer, dtype, rngs)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, rngs)
        self.ffn = MoEBlock(cfg, dtype, rngs) if cfg.moe_layers[layer] else DenseMLP(cfg, dtype, rngs)

    def attend(self, x: jax.Array, kv: LayerKV, meta: AttentionMetadata) -> tuple[jax.Array, LayerKV]:
        out, kv = self.attn(self.input_norm(x), kv, meta)
        return x + out, kv

    def feed_forward(self, h: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
        out, group_sizes = self.ffn(self.post_attn_norm(h), valid)
        return h + out, group_sizes

    def __call__(self, x: jax.Array, kv: LayerKV, meta: AttentionMetadata):
        """x: [T, D] -> (x' [T, D], layer KV, tokens per expert [E])."""
        h, kv = self.attend(x, kv, meta)
        out, group_sizes = self.feed_forward(h, meta.valid)
        return out, kv, group_sizes


class TokenIO(nnx.Module):
    """Token embedding in, final norm and LM head out: the parts of the model outside the layers."""

    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        D, V = cfg.hidden_size, cfg.vocab_size
        self.embed = param(init_normal(rngs, (V, D), 1, dtype), "vocab", "embed")  # [V, D]
        self.final_norm = RMSNorm(D, cfg.rms_norm_eps, dtype, rngs)
        self.lm_head = None if cfg.tie_word_embeddings else param(
            init_normal(rngs, (D, V), D, dtype), "embed", "vocab")  # [D, V]

    def embed_tokens(self, token_ids: jax.Array) -> jax.Array:
        """token_ids: [T] -> [T, D]."""
        return jnp.take(self.embed[...], token_ids, axis=0)

    def logits(self, x: jax.Array) -> jax.Array:
        """x: [T, D] final hidden -> [T, V] fp32 logits."""
        h = self.final_norm(x)
        head = self.embed[...].T if self.lm_head is None else self.lm_head[...]
        return jnp.dot(h, head, preferred_element_type=jnp.float32)


class CausalLM(nnx.Module):
    """Every supported architecture: TokenIO around a list of decoder layers."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, dtype=None):
        dtype = dtype or jnp.dtype(cfg.dtype)
        self.io = TokenIO(cfg, dtype, rngs)
        self.layers = nnx.List([DecoderLayer(cfg, i, dtype, rngs) for i in range(cfg.num_layers)])
