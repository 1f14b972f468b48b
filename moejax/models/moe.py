"""The MoE feed-forward's parts: the router (softmax or sigmoid scores, optionally grouped top-k), the
routed experts' weights, and `routed_experts`, a plain function of (rows, routing, an expert buffer,
its slot map) so that an executor can run the experts on weights it holds anywhere (all of them, an
expert cache, another mesh)."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import kernels
from moejax.config import ModelConfig
from moejax.meshes import sharded_ops
from moejax.meshes.placement import Placement
from moejax.models.layers import expert_param, init_normal, param


@dataclass(frozen=True)
class Routing:
    """How a router turns logits [T, E] into top-k experts and weights (static router structure).

    scoring "softmax" (Mixtral, Qwen, OLMoE, DeepSeek-V2) or "sigmoid" (DeepSeek-V3); with groups > 1
    a row first keeps its topk_groups best groups (a group scores its best expert, "max", or its best
    two, "top2_sum") and picks its k experts within them. A score bias (V3) shifts the choice only:
    the weights are the unbiased scores of the chosen experts, renormalised to sum to one when
    `normalize`, then multiplied by `scaling`.
    """

    top_k: int
    normalize: bool
    scoring: str = "softmax"
    groups: int = 1
    topk_groups: int = 1
    group_score: str = "max"
    scaling: float = 1.0

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> "Routing":
        return cls(cfg.num_experts_per_tok, cfg.norm_topk_prob, cfg.router_scoring, cfg.router_groups,
                   cfg.router_topk_groups, cfg.router_group_score, cfg.routed_scaling_factor)


def route(router_logits: jax.Array, routing: Routing, score_bias: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """router_logits: [T, E], score_bias: [E] or None -> (weights [T, K] fp32, expert ids [T, K] int32)."""
    logits = router_logits.astype(jnp.float32)
    scores = kernels.softmax(logits) if routing.scoring == "softmax" else jax.nn.sigmoid(logits)
    choice = scores if score_bias is None else scores + score_bias.astype(jnp.float32)
    if routing.topk_groups < routing.groups:
        T, E = choice.shape
        grouped = choice.reshape(T, routing.groups, E // routing.groups)
        group_scores = grouped.max(axis=-1) if routing.group_score == "max" else \
            kernels.top_k(grouped, 2)[0].sum(axis=-1)  # [T, G]
        _, best = kernels.top_k(group_scores, routing.topk_groups)
        kept = jnp.zeros(group_scores.shape, bool).at[jnp.arange(T)[:, None], best].set(True)
        choice = jnp.where(jnp.repeat(kept, E // routing.groups, axis=1), choice, -jnp.inf)
    _, ids = kernels.top_k(choice, routing.top_k)
    weights = jnp.take_along_axis(scores, ids, axis=-1)
    if routing.normalize:
        weights = weights / (kernels.row_sum(weights) + 1e-20)
    return weights * routing.scaling, ids.astype(jnp.int32)


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
        self.num_experts, self.routing, self.fp32 = E, Routing.from_config(cfg), cfg.router_fp32
        self.w = param(init_normal(rngs, (D, E), D, dtype), "embed", None)  # [D, E]
        self.b = param(init_normal(rngs, (E,), 4, dtype), None) if cfg.router_bias else None  # [E] (GPT-OSS)
        # [E] fp32 (DeepSeek-V3's e_score_correction_bias): shifts which experts are chosen, not their weights
        self.score_bias = param(init_normal(rngs, (E,), 16, jnp.float32), None) if cfg.router_score_bias else None

    def __call__(self, y: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
        """y: [T, D] normed rows, valid: [T] -> (weights [T, K] fp32, expert ids [T, K]; padding rows
        get id E, which reaches no expert)."""
        w = self.w[...]
        logits = kernels.dense(y.astype(jnp.float32), w.astype(jnp.float32)) if self.fp32 else kernels.dense(y, w)
        if self.b is not None:
            logits = logits + self.b[...]
        weights, ids = route(logits, self.routing, None if self.score_bias is None else self.score_bias[...])
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
