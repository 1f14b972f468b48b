"""Gated DeltaNet linear attention (Qwen3-Next; arXiv 2412.06464, "Gated Delta Networks: Improving
Mamba2 with Delta Rule"): a layer that keeps, per request, a fixed-size state instead of per-token KV.

Per value head, with q, k L2-normalised (q also scaled by key_head_dim^-0.5), decay g_t <= 0 and
write strength beta_t in (0, 1), the state S [key_head_dim, value_head_dim] follows the gated delta
rule

    S_t = exp(g_t) S_{t-1} + beta_t k_t (v_t - exp(g_t) S_{t-1}^T k_t)^T,      o_t = S_t^T q_t

in two forms that give the same result:

    recurrent_step   one token of each of B requests: state in, state out (decode)
    chunk_step       C consecutive tokens of one request at once (prefill): the C writes are folded
                     into a few matmuls (a unit-lower-triangular solve, the "UT transform"), so the
                     chunk is parallel inside; a prompt is a sequence of chunks carrying the state

Before it, a short causal depthwise conv (conv_kernel taps, SiLU) over the projected [q | k | v]:
each request also keeps the conv's last conv_kernel - 1 inputs. After it, an RMSNorm per head gated
by silu(z) and the out projection.

In a layer the rows of an iteration are laid out by `RecurrentMetadata`: single-token slices (decodes)
take one batched recurrent step; longer slices (prompt chunks) pass in tiles of CHUNK consecutive rows
of one request, tile after tile, each reading its request's state slot and writing it back. A slice
starting at position 0 starts from a zero state (a slot's old contents are never read).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import kernels
from moejax.config import ModelConfig
from moejax.models.attention import CacheArray, LayerCache
from moejax.models.layers import RMSNorm, init_normal, param

CHUNK = 64  # rows of a prefill tile: one chunk of the chunked form
GatedDeltaNetState = tuple[jax.Array, jax.Array]  # (conv [slots, K-1, conv_dim], recurrent [slots, Hv, dk, dv] fp32)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class RecurrentMetadata:
    """Where an iteration's rows go in Gated DeltaNet layers (built on the host, `recurrent_metadata`).
    T: the padded row count; S: state slots. Padding entries name row T and slot S (dropped)."""

    step_rows: jax.Array  # [R] int32: the row of each single-token slice
    step_slots: jax.Array  # [R] int32: its request's state slot
    tile_rows: jax.Array  # [N, CHUNK] int32: the rows of each tile (consecutive rows of one request)
    tile_slots: jax.Array  # [N] int32: the tile's request's state slot
    tile_lengths: jax.Array  # [N] int32: real rows in the tile (they come first)


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def causal_conv(conv_state: jax.Array, x: jax.Array, taps: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Depthwise causal conv + SiLU. conv_state [..., K-1, C]: the inputs before x [..., n, C]; taps
    [K, C] (taps[K-1] weighs the current input) -> (y [..., n, C] in x's dtype, the inputs
    [..., K-1+n, C] whose last K-1 up to a row are the conv state after it)."""
    K, n = taps.shape[0], x.shape[-2]
    inputs = jnp.concatenate([conv_state.astype(x.dtype), x], axis=-2)
    wide = inputs.astype(jnp.float32)
    y = sum(wide[..., i:i + n, :] * taps[i].astype(jnp.float32) for i in range(K))
    return jax.nn.silu(y).astype(x.dtype), inputs


def recurrent_step(state: jax.Array, q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array,
                   beta: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One token of each of B requests. state [B, Hv, dk, dv]; q, k [B, Hv, dk]; v [B, Hv, dv];
    g, beta [B, Hv] (all fp32) -> (out [B, Hv, dv], state after the token)."""
    state = state * jnp.exp(g)[..., None, None]
    predicted = jnp.einsum("bhkv,bhk->bhv", state, k)  # what the decayed state recalls for k
    delta = (v - predicted) * beta[..., None]
    state = state + k[..., :, None] * delta[..., None, :]
    return jnp.einsum("bhkv,bhk->bhv", state, q), state


def chunk_step(state: jax.Array, q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array,
               beta: jax.Array) -> tuple[jax.Array, jax.Array]:
    """C consecutive tokens of one request at once. state [Hv, dk, dv]; q, k [C, Hv, dk]; v [C, Hv, dv];
    g, beta [C, Hv] (all fp32) -> (out [C, Hv, dv], state after the C tokens). Trailing rows with
    g = beta = 0 leave the state as it is (a tile's padding)."""
    q, k, v = (jnp.swapaxes(a, 0, 1) for a in (q, k, v))  # heads first: [Hv, C, d]
    g, beta = g.T, beta.T  # [Hv, C]
    C = q.shape[1]
    decay_in = jnp.cumsum(g, axis=-1)  # [Hv, C]: log decay from the chunk start through row i
    causal = jnp.tril(jnp.ones((C, C), bool))
    decay = jnp.exp(jnp.where(causal, decay_in[:, :, None] - decay_in[:, None, :], -jnp.inf))  # [Hv, i, j]: j -> i
    k_beta = k * beta[..., None]
    # Row i's write depends on the writes before it in the chunk: solve (I + L) x = rhs with L the
    # strictly lower beta_i (k_i . k_j) decay(j -> i); x = the values to write (u) and how much of
    # the incoming state each row's write cancels (w).
    system = jnp.where(causal & ~jnp.eye(C, dtype=bool), jnp.einsum("hid,hjd->hij", k_beta, k) * decay, 0.0)
    system = system + jnp.eye(C, dtype=system.dtype)

    def solve(rhs):
        return jax.lax.linalg.triangular_solve(system, rhs, left_side=True, lower=True, unit_diagonal=True)

    u = solve(v * beta[..., None])
    w = solve(k_beta * jnp.exp(decay_in)[..., None])
    new_values = u - w @ state  # [Hv, C, dv]: what each row writes, given the incoming state
    scores = jnp.einsum("hid,hjd->hij", q, k) * decay
    out = (q * jnp.exp(decay_in)[..., None]) @ state + scores @ new_values
    total = decay_in[:, -1]  # [Hv]
    k_to_end = k * jnp.exp(total[:, None] - decay_in)[..., None]
    state = state * jnp.exp(total)[:, None, None] + jnp.einsum("hjd,hje->hde", k_to_end, new_values)
    return jnp.swapaxes(out, 0, 1), state


class GatedDeltaNet(nnx.Module):
    """The linear-attention token mixer of a Qwen3-Next layer. Projections keep HF's layout: per key
    head g, w_qkvz's columns hold [q_g | k_g | v of its value heads | z of its value heads] and
    w_ba's [b | a] of its value heads."""

    @staticmethod
    def cache_layout(cfg: ModelConfig, layer: int) -> LayerCache:
        """Per request: the conv's last K-1 inputs [K-1, conv_dim] and the recurrent state
        [Hv, dk, dv] (fp32: it accumulates over the whole sequence)."""
        s = cfg.linear_attention
        return LayerCache("recurrent", (
            CacheArray("conv", (s.conv_kernel - 1, s.conv_dim), (None, None)),
            CacheArray("recurrent", (s.num_value_heads, s.key_head_dim, s.value_head_dim), (None, None, None),
                       "float32")), per_request=True)

    def __init__(self, cfg: ModelConfig, layer: int, dtype, rngs: nnx.Rngs):
        s = cfg.linear_attention
        D = cfg.hidden_size
        self.shape = s
        nv, K = s.num_value_heads, s.conv_kernel
        self.w_qkvz = param(init_normal(rngs, (D, 2 * s.key_dim + 2 * s.value_dim), D, dtype), "embed", None)
        self.w_ba = param(init_normal(rngs, (D, 2 * nv), D, dtype), "embed", None)
        self.conv_taps = param(init_normal(rngs, (K, s.conv_dim), K, dtype), None, None)  # [K, conv_dim]
        # decay rate: g = -exp(A_log) * softplus(a + dt_bias); random models decay by 0.4-0.9 a token
        self.A_log = param(jnp.log(jax.random.uniform(rngs.params(), (nv,), jnp.float32, 0.1, 1.0)).astype(dtype),
                           None)
        self.dt_bias = param(jnp.ones((nv,), dtype), None)
        self.norm = RMSNorm(s.value_head_dim, cfg.rms_norm_eps, dtype, rngs)  # gated by silu(z), per head
        self.w_out = param(init_normal(rngs, (s.value_dim, D), s.value_dim, dtype), None, "embed")

    def __call__(self, x: jax.Array, cache: GatedDeltaNetState, meta, placement=None):
        """x: [T, D] (normed hidden) -> ([T, D], the state slots with this iteration's rows written)."""
        if meta.recurrent is None:
            raise ValueError("a Gated DeltaNet layer needs state slots in its metadata: "
                             "attention_metadata(..., state_slots=..., num_state_slots=...)")
        s, T, dtype = self.shape, x.shape[0], x.dtype
        nk, nv, r = s.num_key_heads, s.num_value_heads, s.num_value_heads // s.num_key_heads
        dk, dv = s.key_head_dim, s.value_head_dim
        qkvz, ba = kernels.dense(x, self.w_qkvz[...], self.w_ba[...])
        q, k, v, z = jnp.split(qkvz.reshape(T, nk, 2 * dk + 2 * r * dv), [dk, 2 * dk, 2 * dk + r * dv], axis=-1)
        b, a = (p.reshape(T, nv) for p in jnp.split(ba.reshape(T, nk, 2 * r), 2, axis=-1))
        mixed = jnp.concatenate([q.reshape(T, -1), k.reshape(T, -1), v.reshape(T, -1)], axis=-1)  # conv input
        beta = jax.nn.sigmoid(b.astype(jnp.float32))
        g = -jnp.exp(self.A_log[...].astype(jnp.float32)) * jax.nn.softplus(
            a.astype(jnp.float32) + self.dt_bias[...].astype(jnp.float32))
        out, cache = self._mix(mixed, g, beta, cache, meta)
        gate = jax.nn.silu(z.reshape(T, nv, dv).astype(jnp.float32))
        y = (self.norm(out.astype(dtype)).astype(jnp.float32) * gate).astype(dtype)
        return kernels.dense(y.reshape(T, -1), self.w_out[...]), cache

    def _heads(self, conv_out: jax.Array):
        """[n, conv_dim] -> q, k [n, Hv, dk] (L2-normalised, q scaled, each key head repeated for its
        value heads), v [n, Hv, dv]; fp32."""
        s, n = self.shape, conv_out.shape[0]
        q, k, v = jnp.split(conv_out.astype(jnp.float32), [s.key_dim, 2 * s.key_dim], axis=-1)
        r = s.num_value_heads // s.num_key_heads
        q = l2_normalize(q.reshape(n, s.num_key_heads, -1)) * s.key_head_dim ** -0.5
        k = l2_normalize(k.reshape(n, s.num_key_heads, -1))
        return jnp.repeat(q, r, axis=1), jnp.repeat(k, r, axis=1), v.reshape(n, s.num_value_heads, -1)

    def _mix(self, mixed, g, beta, cache: GatedDeltaNetState, meta):
        """conv + gated delta rule of every row, the decodes in one step, the prompt tiles one after
        the other -> (out [T, Hv, dv] fp32, state slots)."""
        rec, positions = meta.recurrent, meta.positions
        conv_slots, state_slots = cache
        T, taps = mixed.shape[0], self.conv_taps[...]
        s = self.shape
        out = jnp.zeros((T, s.num_value_heads, s.value_head_dim), jnp.float32)

        def take(a, i):  # padding indices (past the end) read zeros
            return jnp.take(a, i, axis=0, mode="fill", fill_value=0)

        if rec.step_rows.shape[0]:  # single-token slices: one recurrent step each
            # rows of requests that stopped inside a multi-step decode are no longer valid: not written
            rows = rec.step_rows
            slots = jnp.where(take(meta.valid, rows), rec.step_slots, conv_slots.shape[0])
            fresh = (take(positions, rows) == 0)[:, None, None]
            conv_in = jnp.where(fresh, 0, take(conv_slots, slots))
            y, inputs = causal_conv(conv_in, take(mixed, rows)[:, None], taps)
            q, k, v = self._heads(y[:, 0])
            o, state = recurrent_step(jnp.where(fresh[..., None], 0.0, take(state_slots, slots)), q, k, v,
                                      take(g, rows), take(beta, rows))
            conv_slots = conv_slots.at[slots].set(inputs[:, 1:], mode="drop")
            state_slots = state_slots.at[slots].set(state, mode="drop")
            out = out.at[rows].set(o, mode="drop")

        if rec.tile_rows.shape[0]:  # prompt tiles, in order: a request's later tiles read what earlier ones wrote
            def tile(carry, args):
                conv_slots, state_slots = carry
                rows, slot, n = args
                real = (jnp.arange(rows.shape[0]) < n)[:, None]
                fresh = take(positions, rows[0]) == 0
                conv_in = jnp.where(fresh, 0, take(conv_slots, slot))
                y, inputs = causal_conv(conv_in, take(mixed, rows), taps)
                q, k, v = self._heads(y)
                o, state = chunk_step(jnp.where(fresh, 0.0, take(state_slots, slot)), q, k, v,
                                      jnp.where(real, take(g, rows), 0.0), jnp.where(real, take(beta, rows), 0.0))
                conv_slots = conv_slots.at[slot].set(
                    jax.lax.dynamic_slice_in_dim(inputs, n, s.conv_kernel - 1), mode="drop")
                return (conv_slots, state_slots.at[slot].set(state, mode="drop")), o

            (conv_slots, state_slots), o = jax.lax.scan(
                tile, (conv_slots, state_slots), (rec.tile_rows, rec.tile_slots, rec.tile_lengths))
            out = out.at[rec.tile_rows.reshape(-1)].set(o.reshape(-1, *o.shape[2:]), mode="drop")
        return out, (conv_slots, state_slots)

