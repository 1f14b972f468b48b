"""What an iteration must move and compute, per layer: bytes of weights and KV, and FLOPs.

One accounting for every executor: the JAX executor feeds it the experts the routers really chose,
the simulator the experts its routing model drew. Bytes are the ideal ("must be read") traffic: each
weight read once per layer per iteration, each routed expert read once if any row reaches it, each
slice reading once the KV its rows attend to (a prefill chunk reads its context once, not once per
row: attention kernels tile the rows, and the FLOPs, not the bytes, grow with rows × keys). A Gated
DeltaNet layer keeps no per-token KV: each slice reads its request's state slot (unless it starts
the request at position 0) and writes it back, whatever its length.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np

from moejax.config import ModelConfig
from moejax.engine.plan import IterationPlan, LayerStats


@dataclass(frozen=True)
class LayerShape:
    """Parameter and KV sizes of one layer, in elements."""

    attn_params: int
    dense_ffn_params: int  # dense MLP (non-MoE layer) or shared expert + router + gate (MoE layer)
    expert_params: int  # one routed expert; 0 for a dense layer
    kv_elems_per_token: int
    window: int | None
    state_bytes: int = 0  # one request's fixed-size state (Gated DeltaNet layer), read and written per slice


def attn_params(cfg: ModelConfig, layer: int) -> int:
    """Parameters of a layer's token mixer and its two norms."""
    D = cfg.hidden_size
    if cfg.linear_layers[layer]:
        return cfg.linear_attention.attn_params(D)
    if cfg.mla:
        return cfg.mla.attn_params(D, cfg.num_heads)
    # q (+ its output gate), o, k, v + the two norms
    return D * cfg.q_size * (3 if cfg.attn_output_gate else 2) + D * cfg.kv_size * 2 + 2 * D


@cache  # a pure function of the (frozen) config, asked for every simulated iteration
def layer_shapes(cfg: ModelConfig) -> tuple[LayerShape, ...]:
    D = cfg.hidden_size
    shapes = []
    for i in range(cfg.num_layers):
        if cfg.moe_layers[i]:
            dense = D * cfg.num_experts + 3 * D * cfg.shared_expert_intermediate_size \
                + (D if cfg.shared_expert_gate else 0)
            expert = cfg.expert_params()
        else:
            dense, expert = 3 * D * cfg.dense_intermediate_size, 0
        shapes.append(LayerShape(attn_params(cfg, i), dense, expert, cfg.kv_elems_per_token(i), cfg.sliding_windows[i],
                                 cfg.state_bytes(i)))
    return tuple(shapes)


@cache
def _expert_bytes_per_layer(cfg: ModelConfig) -> np.ndarray:
    return np.array([s.expert_params for s in layer_shapes(cfg)], float) * cfg.dtype_bytes


def routed_expert_bytes(cfg: ModelConfig, distinct_experts: np.ndarray) -> float:
    """Routed-expert weight bytes an iteration must read, from the experts each layer activated [L]
    (summed over steps when it ran several): each once per layer and step (what
    layer_stats(...).total_expert_bytes gives, cheaply)."""
    return float(distinct_experts @ _expert_bytes_per_layer(cfg))


def model_bytes(cfg: ModelConfig) -> int:
    """Bytes of all weights: the layers (every expert) plus embedding and LM head."""
    layers = sum(s.attn_params + s.dense_ffn_params + cfg.num_experts * s.expert_params
                 for s in layer_shapes(cfg))
    io = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2) + cfg.hidden_size
    return (layers + io) * cfg.dtype_bytes


def attended_keys(start: int, n: int, window: int | None) -> int:
    """Keys read by rows at positions start .. start+n-1 (causal, optional sliding window):
    sum over v in [start+1, start+n] of min(v, window), in closed form."""
    def triangle(a: int, b: int) -> int:  # a+1 + ... + b
        return (b * (b + 1) - a * (a + 1)) // 2

    end = start + n
    if window is None or end <= window:
        return triangle(start, end)
    if start >= window:
        return n * window
    return triangle(start, window) + (end - window) * window


def keys_read(start: np.ndarray, n: np.ndarray, window: int | None) -> np.ndarray:
    """[S] distinct keys the rows start .. start+n-1 attend to: positions max(0, start-window+1)
    .. start+n-1 (row p sees keys p-window+1 .. p)."""
    return start + n if window is None else np.minimum(start + n, n + window - 1)


def attended_keys_many(start: np.ndarray, n: np.ndarray, window: int | None) -> np.ndarray:
    """`attended_keys` for arrays of slices ([S] int64 starts and lengths), same closed form."""
    def triangle(a, b):
        return (b * (b + 1) - a * (a + 1)) // 2

    end = start + n
    if window is None:
        return triangle(start, end)
    straddle = triangle(np.minimum(start, window), window) + (end - window) * window
    return np.where(end <= window, triangle(start, end), np.where(start >= window, n * window, straddle))


@dataclass
class LayerWork:
    tokens: np.ndarray  # [L] rows that pass each layer
    attended_keys: np.ndarray  # [L] sum over those rows of the keys each attends to (FLOPs)
    keys_read: np.ndarray  # [L] sum over the slices of the distinct keys their rows attend to (bytes)
    slices: np.ndarray  # [L] slices that pass each layer (state slots written)
    resumed: np.ndarray  # [L] of those, slices past position 0 (state slots read)
    attention_flops: np.ndarray  # [L] scores and values (MLA: with its kv up-projection), `attention_core_flops`


def kv_up_params(cfg: ModelConfig) -> int:
    """MLA's kv up-projection (W_uk | W_uv of every head): applied per key read (naive form) or per row
    (absorbed form) rather than per new token; 0 without MLA."""
    m = cfg.mla
    return 0 if m is None else m.kv_lora_rank * cfg.num_heads * (m.qk_nope_head_dim + m.v_head_dim)


def attention_core_flops(cfg: ModelConfig, n: np.ndarray, attended: np.ndarray, read: np.ndarray) -> np.ndarray:
    """[S] FLOPs of slices of n rows attending `attended` keys in all, `read` distinct: scores and values
    per head (2 per multiply-add). MLA runs each slice in the cheaper of its forms, as its kernel
    chooses: naive decompresses every key read, then attends per head over nope + rope and v dims;
    absorbed folds W_uk / W_uv into each row's query and output (the up-projection once per row) and
    attends over the latent, r + rope for scores and r for values. Decode rows: absorbed."""
    H = cfg.num_heads
    if cfg.mla is None:
        return 4.0 * attended * H * cfg.head_dim
    m, up = cfg.mla, kv_up_params(cfg)
    naive = 2.0 * (read * up + attended * H * (m.qk_head_dim + m.v_head_dim))
    absorbed = 2.0 * (n * up + attended * H * (2 * m.kv_lora_rank + m.qk_rope_head_dim))
    return np.minimum(naive, absorbed)


def layer_work(cfg: ModelConfig, plan: IterationPlan) -> LayerWork:
    """Vectorised over slices (the simulator prices thousands of plans): each slice adds its value
    to the layers [layer_start, layer_end) through a difference array."""
    L, S = cfg.num_layers, len(plan.slices)
    start = np.fromiter((s.start for s in plan.slices), np.int64, S)
    n = np.fromiter((s.num_tokens for s in plan.slices), np.int64, S)
    first = np.fromiter((s.layer_start for s in plan.slices), np.int64, S)
    end = np.fromiter((s.layer_end for s in plan.slices), np.int64, S)

    def over_layers(per_slice: np.ndarray, dtype=np.int64) -> np.ndarray:  # [S] -> [L]
        diff = np.bincount(first, per_slice, L + 1) - np.bincount(end, per_slice, L + 1)  # exact below 2**53
        return np.cumsum(diff[:L]).astype(dtype)

    windows = cfg.sliding_windows
    attended, read = np.zeros(L, np.int64), np.zeros(L, np.int64)
    flops = np.zeros(L)
    for w in set(windows):  # attention layers of each window (Gated DeltaNet layers attend to no keys)
        in_layer = np.array([x == w and not linear for x, linear in zip(windows, cfg.linear_layers)])
        slice_attended, slice_read = attended_keys_many(start, n, w), keys_read(start, n, w)
        attended += over_layers(slice_attended) * in_layer
        read += over_layers(slice_read) * in_layer
        flops += over_layers(attention_core_flops(cfg, n, slice_attended, slice_read), float) * in_layer
    return LayerWork(over_layers(n), attended, read, over_layers(np.ones(S, np.int64)),
                     over_layers((start > 0).astype(np.int64)), flops)


def layer_stats(cfg: ModelConfig, plan: IterationPlan, expert_tokens: np.ndarray | None = None,
                distinct_experts: np.ndarray | None = None, work: LayerWork | None = None) -> LayerStats:
    """Per-layer traffic of a plan, given tokens per expert [L, E] or just distinct experts [L].
    `work`: the plan's layer_work, when the caller already has it."""
    if distinct_experts is None:
        distinct_experts = (expert_tokens > 0).sum(axis=1) if expert_tokens is not None else \
            np.zeros(cfg.num_layers, np.int64)
    expert, dense, kv_elems, state = _layer_columns(cfg)
    work = work if work is not None else layer_work(cfg, plan)
    distinct_experts = np.asarray(distinct_experts)  # expected counts (pricing) are fractional: bytes keep them
    nbytes = cfg.dtype_bytes
    return LayerStats(
        distinct_experts=distinct_experts.astype(np.int64),
        expert_bytes=(distinct_experts * expert * nbytes).astype(float),
        dense_weight_bytes=np.where(work.tokens > 0, dense * nbytes, 0).astype(float),
        kv_read_bytes=(work.keys_read * kv_elems * nbytes + work.resumed * state).astype(float),
        kv_write_bytes=(work.tokens * kv_elems * nbytes + work.slices * state).astype(float),
        tokens=work.tokens,
        expert_tokens=expert_tokens,
    )


@cache
def _layer_columns(cfg: ModelConfig) -> tuple[np.ndarray, ...]:
    """layer_shapes as [L] int64 columns: one routed expert's, the dense weights' (attention + dense
    FFN) and per-token KV elements, state bytes -- layer_stats' operands, vectorised over layers."""
    shapes = layer_shapes(cfg)
    return tuple(np.array(column, np.int64) for column in (
        [s.expert_params for s in shapes], [s.attn_params + s.dense_ffn_params for s in shapes],
        [s.kv_elems_per_token for s in shapes], [s.state_bytes for s in shapes]))


def mixer_flops_per_token(cfg: ModelConfig) -> np.ndarray:
    """[L] FLOPs a token spends in each Gated DeltaNet layer beyond its projections: the conv, and
    the gated delta rule's four state-sized steps (decay, recall, write, read); 0 in attention layers."""
    s = cfg.linear_attention
    if s is None:
        return np.zeros(cfg.num_layers)
    per_token = 2.0 * s.conv_kernel * s.conv_dim + 8.0 * s.recurrent_state_elems
    return np.array(cfg.linear_layers, float) * per_token


def layer_flops_parts(cfg: ModelConfig, plan: IterationPlan,
                      work: LayerWork | None = None) -> tuple[np.ndarray, np.ndarray]:
    """[L] attention FLOPs (projections, scores and values; Gated DeltaNet: conv and state updates)
    and [L] FFN FLOPs (router, dense MLP or shared expert, the k routed experts of every row); 2
    FLOPs per multiply-add."""
    shapes = layer_shapes(cfg)
    work = work if work is not None else layer_work(cfg, plan)
    k = cfg.num_experts_per_tok
    # per new token: every attention projection but MLA's kv up-projection (in work.attention_flops)
    proj_params = np.array([s.attn_params - kv_up_params(cfg) for s in shapes], float)
    ffn_params = np.array([s.dense_ffn_params + k * s.expert_params for s in shapes], float)
    attn = 2.0 * work.tokens * proj_params + work.attention_flops + work.tokens * mixer_flops_per_token(cfg)
    return attn, 2.0 * work.tokens * ffn_params


def layer_flops(cfg: ModelConfig, plan: IterationPlan, work: LayerWork | None = None) -> np.ndarray:
    """[L] FLOPs: projections and experts (2 per multiply-add) plus attention scores and values."""
    attn, ffn = layer_flops_parts(cfg, plan, work)
    return attn + ffn
