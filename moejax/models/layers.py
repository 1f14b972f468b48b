"""Building blocks shared by all architectures: parameters with logical axes, RMSNorm, RoPE, SwiGLU."""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax import kernels
from moejax.config import ModelConfig, RopeConfig

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def param(value: jax.Array, *logical_axes: str | None) -> nnx.Param:
    """A parameter annotated with logical axis names (one per dim); meshes/ maps them to mesh axes.

    Placement is decided by the loader and the layout, never eagerly at creation.
    """
    assert len(logical_axes) == value.ndim, (logical_axes, value.shape)
    return nnx.Param(value, out_sharding=logical_axes, eager_sharding=False)


class ExpertParam(nnx.Param):
    """A routed expert's weights: kept apart from the rest of a layer so executors can place them
    elsewhere (another submesh, host memory) and compute with any buffer of experts."""


def expert_param(value: jax.Array, *logical_axes: str | None) -> ExpertParam:
    assert len(logical_axes) == value.ndim, (logical_axes, value.shape)
    return ExpertParam(value, out_sharding=logical_axes, eager_sharding=False)


def init_normal(rngs: nnx.Rngs, shape: tuple[int, ...], fan_in: int, dtype) -> jax.Array:
    """1/sqrt(fan_in) normal init: keeps random tiny models well-conditioned (no near-tie argmaxes)."""
    return (jax.random.normal(rngs.params(), shape, jnp.float32) / math.sqrt(fan_in)).astype(dtype)


class RMSNorm(nnx.Module):
    """zero_centered (Qwen3-Next): the weight w scales by 1 + w (it starts at 0), applied in fp32
    before the cast back, as that model computes it."""

    def __init__(self, dim: int, eps: float, dtype, rngs: nnx.Rngs, axis: str | None = None,
                 zero_centered: bool = False):
        self.weight = param((jnp.zeros if zero_centered else jnp.ones)((dim,), dtype), axis)
        self.eps = eps
        self.zero_centered = zero_centered

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(kernels.row_sum(x32 * x32) / x.shape[-1] + self.eps)
        if self.zero_centered:
            return (y * (1.0 + self.weight[...].astype(jnp.float32))).astype(x.dtype)
        return self.weight[...] * y.astype(x.dtype)


# --- rotary embeddings ------------------------------------------------------------------------------

def rope_frequencies(rope: RopeConfig, head_dim: int) -> tuple[np.ndarray, float]:
    """(inv_freq [head_dim // 2] float32, attention scaling) for the config's RoPE type, as HF computes them."""
    dim = head_dim
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    pos_freqs = np.float32(rope.theta) ** exponents
    inv_freq = (np.float32(1.0) / pos_freqs).astype(np.float32)
    scaling = 1.0
    if rope.kind == "linear":
        inv_freq = inv_freq / np.float32(rope.factor)
    elif rope.kind == "llama3":
        old_ctx = rope.original_max_position
        low_wavelen = old_ctx / rope.low_freq_factor
        high_wavelen = old_ctx / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_ctx / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = np.where(medium, smoothed, scaled).astype(np.float32)
    elif rope.kind == "yarn":
        inv_freq, scaling = _yarn(rope, dim, pos_freqs)
    return inv_freq.astype(np.float32), float(scaling)


def _yarn(rope: RopeConfig, dim: int, pos_freqs: np.ndarray) -> tuple[np.ndarray, float]:
    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if rope.attention_factor is not None:
        scaling = rope.attention_factor
    elif rope.mscale and rope.mscale_all_dim:
        scaling = mscale(rope.factor, rope.mscale) / mscale(rope.factor, rope.mscale_all_dim)
    else:
        scaling = mscale(rope.factor)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(rope.original_max_position / (rotations * 2 * math.pi))) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation = np.float32(1) - ramp.astype(np.float32)
    inv_extra = np.float32(1.0) / pos_freqs
    inv_inter = np.float32(1.0) / (np.float32(rope.factor) * pos_freqs)
    return (inv_inter * (1 - extrapolation) + inv_extra * extrapolation).astype(np.float32), scaling


@dataclass(frozen=True)
class Rope:
    """Rotary embedding; cos/sin computed from positions on the fly. Frequency i rotates the pair
    (x[i], x[i + d/2]) (HF's rotate-half convention) or, interleaved (DeepSeek), (x[2i], x[2i+1]);
    the interleaved result comes out de-interleaved (evens' rotations, then odds'), as transformers'
    DeepSeek-V3 writes it: q . k is the same either way, only the layout of the rotated dims differs.
    Partial (x wider than the rotated width, Qwen3-Next's cfg.rotary_dim): only the first dims rotate.

    Frozen and hashable: it is static structure of the attention module (part of its graphdef).
    """

    inv_freq: tuple[float, ...]  # [dim // 2]
    scaling: float
    interleaved: bool = False

    @classmethod
    def from_config(cls, cfg: ModelConfig, dim: int | None = None, interleaved: bool = False) -> "Rope":
        """dim: the rotated width (default cfg.rotary_dim: head_dim unless partial; MLA rotates only its rope part)."""
        inv_freq, scaling = rope_frequencies(cfg.rope, dim or cfg.rotary_dim)
        return cls(tuple(float(f) for f in inv_freq), scaling, interleaved)

    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        """x: [T, heads, width >= dim], positions: [T] -> x, its first dim dims rotated."""
        dim = 2 * len(self.inv_freq)
        if dim < x.shape[-1]:
            return jnp.concatenate([self(x[..., :dim], positions), x[..., dim:]], axis=-1)
        inv_freq = jnp.asarray(self.inv_freq, jnp.float32)
        freqs = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [T, dim/2]
        if not self.interleaved:
            freqs = jnp.concatenate([freqs, freqs], axis=-1)
        # cos and sin materialized once per row: fused into their consumer, XLA evaluates them again
        # for every head's element
        cos, sin = jax.lax.optimization_barrier(((jnp.cos(freqs) * self.scaling).astype(x.dtype)[:, None, :],
                                                 (jnp.sin(freqs) * self.scaling).astype(x.dtype)[:, None, :]))
        if self.interleaved:
            x1, x2 = x[..., 0::2], x[..., 1::2]
            return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
        half = x.shape[-1] // 2
        rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
        return x * cos + rotated * sin


class SwiGLU(nnx.Module):
    """A dense SwiGLU MLP (dense layers and shared experts). w_gate_up: [D, 2F] (gate | up), w_down: [F, D]."""

    def __init__(self, dim: int, hidden: int, dtype, rngs: nnx.Rngs):
        self.w_gate_up = param(init_normal(rngs, (dim, 2 * hidden), dim, dtype), "embed", "mlp")
        self.w_down = param(init_normal(rngs, (hidden, dim), hidden, dtype), "mlp", "embed")

    def __call__(self, x: jax.Array) -> jax.Array:
        gate, up = jnp.split(kernels.dense(x, self.w_gate_up[...]), 2, axis=-1)
        return kernels.dense(jax.nn.silu(gate) * up, self.w_down[...])
