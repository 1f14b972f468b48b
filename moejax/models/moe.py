"""The MoE block: router (softmax top-k, optionally renormalised), routed SwiGLU experts through
`moejax.kernels.moe_ffn`, and the optional gated shared expert (Qwen2-MoE)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import kernels
from moejax.config import ModelConfig
from moejax.meshes import sharded_ops
from moejax.models.layers import SwiGLU, init_normal, param


def route(router_logits: jax.Array, top_k: int, normalize: bool) -> tuple[jax.Array, jax.Array]:
    """router_logits: [T, E] -> (weights [T, K] fp32, expert ids [T, K] int32).

    Softmax over all experts in fp32, then top-k; Mixtral / Qwen3 renormalise the k weights to sum to
    one (`norm_topk_prob`), Qwen2-MoE / OLMoE keep the raw probabilities.
    """
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    weights, ids = jax.lax.top_k(probs, top_k)
    if normalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, ids.astype(jnp.int32)


class MoEBlock(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        D, E, F = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
        self.num_experts, self.top_k, self.norm_topk_prob = E, cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.w_router = param(init_normal(rngs, (D, E), D, dtype), "embed", None)  # [D, E]
        self.w_gate_up = param(init_normal(rngs, (E, D, 2 * F), D, dtype), "expert", "embed", "expert_mlp")  # [E, D, 2F]
        self.w_down = param(init_normal(rngs, (E, F, D), F, dtype), "expert", "expert_mlp", "embed")  # [E, F, D]
        self.shared_expert = (SwiGLU(D, cfg.shared_expert_intermediate_size, dtype, rngs)
                              if cfg.shared_expert_intermediate_size else None)
        self.w_shared_gate = (param(init_normal(rngs, (D, 1), D, dtype), "embed", None)
                              if cfg.shared_expert_gate else None)  # [D, 1]

    def route(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x: [T, D] -> (weights [T, K] fp32, expert ids [T, K])."""
        return route(x @ self.w_router[...], self.top_k, self.norm_topk_prob)

    def __call__(self, x: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x: [T, D], valid: [T] -> (out [T, D], tokens per expert [E]; padding rows reach no expert)."""
        weights, ids = self.route(x)
        ids = jnp.where(valid[:, None], ids, self.num_experts)
        out, group_sizes = sharded_ops.experts(kernels.moe_ffn, x, ids, weights, self.w_gate_up[...],
                                               self.w_down[...])
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.w_shared_gate is not None:
                shared = jax.nn.sigmoid(x @ self.w_shared_gate[...]) * shared
            out = out + shared
        return out, group_sizes


class DenseMLP(nnx.Module):
    """The feed-forward of a non-MoE layer; reports no activated experts."""

    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        self.mlp = SwiGLU(cfg.hidden_size, cfg.dense_intermediate_size, dtype, rngs)
        self.num_experts = cfg.num_experts

    def __call__(self, x: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.mlp(x), jnp.zeros((self.num_experts,), jnp.int32)
