"""The MoE feed-forward's parts: the router, the routed experts' weights, and `routed_experts`, a
plain function of (rows, routing, an expert buffer, its slot map) so that an executor can run the
experts on weights it holds anywhere (all of them, an expert cache, another mesh)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import kernels
from moejax.config import ModelConfig
from moejax.meshes import sharded_ops
from moejax.meshes.placement import Placement
from moejax.models.layers import SwiGLU, expert_param, init_normal, param


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


def expert_activation(cfg: ModelConfig) -> kernels.reference.Activation:
    """The routed experts' gated activation: SwiGLU, or GPT-OSS's clamped SwiGLU."""
    if cfg.swiglu_limit is None:
        return "silu"
    return kernels.ClampedSwiGLU(alpha=cfg.swiglu_alpha, limit=cfg.swiglu_limit)


def routed_experts(y: jax.Array, ids: jax.Array, weights: jax.Array, w_gate_up: jax.Array, w_down: jax.Array,
                   slot_of: jax.Array | None, placement: Placement | None, *biases: jax.Array,
                   activation: kernels.reference.Activation = "silu") -> jax.Array:
    """y: [T, D] normed rows, ids / weights: [T, K] (id E: a padding row), an expert buffer w_gate_up:
    [S, D, 2F], w_down: [S, F, D] (biased experts: also b_gate_up [S, 2F], b_down [S, D]) and its slot
    map slot_of: [E] (None: slot e holds expert e) -> [T, D], the weighted sum of each row's experts.
    Every expert a row needs must be in the buffer."""
    def moe(x, ids, weights, w_gate_up, w_down, slot_of, b_gate_up=None, b_down=None):
        return kernels.moe_ffn(x, ids, weights, w_gate_up, w_down, slot_of, activation=activation,
                               b_gate_up=b_gate_up, b_down=b_down)[0]
    return sharded_ops.experts(placement, moe, y, ids, weights, w_gate_up, w_down, slot_of, *biases)


def expert_counts(ids: jax.Array, num_experts: int) -> jax.Array:
    """ids: [T, K] (E: padding) -> tokens per expert [E] int32: what executors report as activated."""
    return jnp.zeros((num_experts,), jnp.int32).at[ids.reshape(-1)].add(1, mode="drop")


class Router(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        D, E = cfg.hidden_size, cfg.num_experts
        self.num_experts, self.top_k, self.normalize = E, cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.w = param(init_normal(rngs, (D, E), D, dtype), "embed", None)  # [D, E]
        self.b = param(init_normal(rngs, (E,), 4, dtype), None) if cfg.router_bias else None  # [E] (GPT-OSS)

    def __call__(self, y: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
        """y: [T, D] normed rows, valid: [T] -> (weights [T, K] fp32, expert ids [T, K]; padding rows
        get id E, which reaches no expert)."""
        logits = y @ self.w[...]
        if self.b is not None:
            logits = logits + self.b[...]
        weights, ids = route(logits, self.top_k, self.normalize)
        return weights, jnp.where(valid[:, None], ids, self.num_experts)


class RoutedExperts(nnx.Module):
    """One MoE layer's routed experts, kept apart from its layer (CausalLM.experts) so that executors
    can hold them elsewhere: w_gate_up [E, D, 2F] (gate | up), w_down [E, F, D]; biased experts
    (GPT-OSS) also b_gate_up [E, 2F] (gate | up) and b_down [E, D]."""

    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        D, E, F = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
        self.w_gate_up = expert_param(init_normal(rngs, (E, D, 2 * F), D, dtype), "expert", "embed", "expert_mlp")
        self.w_down = expert_param(init_normal(rngs, (E, F, D), F, dtype), "expert", "expert_mlp", "embed")
        if cfg.expert_bias:
            self.b_gate_up = expert_param(init_normal(rngs, (E, 2 * F), 4, dtype), "expert", "expert_mlp")
            self.b_down = expert_param(init_normal(rngs, (E, D), 4, dtype), "expert", "embed")
