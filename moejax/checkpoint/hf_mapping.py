"""HF tensor names -> moejax parameters, per architecture, for both expert layouts HF writes.

Each moejax parameter gets a *source*: a recipe that can produce any slice of the parameter (in
moejax layout) by reading only the matching part of the checkpoint tensors. That is what lets the
loader stream each device's shard straight from the memory-mapped files.

    legacy layout (transformers < 5, and the default of save_pretrained):
        Mixtral   model.layers.N.block_sparse_moe.experts.M.{w1,w3,w2}.weight   [F, D], [F, D], [D, F]
        Qwen/OLMoE model.layers.N.mlp.experts.M.{gate,up,down}_proj.weight
    fused layout (transformers >= 5, save_original_format=False):
        model.layers.N.mlp.experts.gate_up_proj [E, 2F, D], model.layers.N.mlp.experts.down_proj [E, D, F]
    GPT-OSS (its own layout: fused, [in, out], gate and up interleaved column by column, biased):
        model.layers.N.mlp.experts.gate_up_proj [E, D, 2F], ..._bias [E, 2F], down_proj [E, F, D],
        down_proj_bias [E, D]; model.layers.N.mlp.router.{weight [E, D], bias [E]};
        model.layers.N.self_attn.sinks [H]

DeepSeek's latent attention maps its own projections (q_proj or q_a_proj / q_a_layernorm / q_b_proj,
kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj), its router's e_score_correction_bias and its
`shared_experts`.

Qwen3-Next's Gated DeltaNet layers (model.layers.N.linear_attn.*) keep HF's projection layouts; the
depthwise conv weight [C, 1, K] becomes taps [K, C].
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from moejax.config import ModelConfig


def dotted(path: tuple) -> str:
    """('layers', 0, 'attn', 'w_q') -> 'layers.0.attn.w_q': a parameter's path as param_sources names it."""
    return ".".join(str(getattr(p, "key", p)) for p in path)

Index = tuple[slice, ...]
Reader = Callable[[str], np.ndarray]  # tensor name -> lazily-read array


def _norm(index: Index, shape: tuple[int, ...]) -> tuple[range, ...]:
    return tuple(range(*s.indices(n)) for s, n in zip(index, shape))


@dataclass(frozen=True)
class Transposed:
    """param = tensor.T (a Linear weight [out, in] -> [in, out]); 1-D tensors are taken as they are."""

    name: str

    def names(self) -> list[str]:
        return [self.name]

    def expected_shapes(self, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        return {self.name: tuple(reversed(shape))}

    def read(self, get: Reader, index: Index) -> np.ndarray:
        return get(self.name)[tuple(reversed(index))].T


@dataclass(frozen=True)
class Direct:
    name: str

    def names(self) -> list[str]:
        return [self.name]

    def expected_shapes(self, shape):
        return {self.name: shape}

    def read(self, get: Reader, index: Index) -> np.ndarray:
        return get(self.name)[index]


@dataclass(frozen=True)
class StackedExperts:
    """param[e] = concat(first[e].T, second[e].T, axis=-1): per-expert Linear weights stacked along E.

    gate/up: first = gate [F, D], second = up [F, D] -> [E, D, 2F]; down: first = down [D, F] -> [E, F, D].
    """

    first: tuple[str, ...]
    second: tuple[str, ...] = ()

    def names(self) -> list[str]:
        return [*self.first, *self.second]

    def expected_shapes(self, shape):
        _, d_in, d_out = shape
        width = d_out // 2 if self.second else d_out
        return {n: (width, d_in) for n in self.names()}

    def read(self, get: Reader, index: Index) -> np.ndarray:
        e_sl, in_sl, out_sl = index
        per_expert = []
        for e in range(*e_sl.indices(len(self.first))):
            if not self.second:
                per_expert.append(get(self.first[e])[out_sl, in_sl].T)
                continue
            width = get(self.first[e]).shape[0]
            outs = range(*out_sl.indices(2 * width))
            lo, hi = outs.start, outs.stop
            parts = []
            if lo < width:
                parts.append(get(self.first[e])[lo:min(hi, width), in_sl].T)
            if hi > width:
                parts.append(get(self.second[e])[max(lo, width) - width:hi - width, in_sl].T)
            per_expert.append(np.concatenate(parts, axis=-1))
        return np.stack(per_expert)


@dataclass(frozen=True)
class FusedExperts:
    """param = tensor.transpose(0, 2, 1): HF's fused [E, out, in] -> moejax [E, in, out]."""

    name: str

    def names(self) -> list[str]:
        return [self.name]

    def expected_shapes(self, shape):
        return {self.name: (shape[0], shape[2], shape[1])}

    def read(self, get: Reader, index: Index) -> np.ndarray:
        e_sl, in_sl, out_sl = index
        return get(self.name)[e_sl, out_sl, in_sl].transpose(0, 2, 1)


@dataclass(frozen=True)
class Concat:
    """param = concat(a.T, b.T, axis=-1) for a dense gate/up pair: [F, D] x 2 -> [D, 2F]."""

    a: str
    b: str

    def names(self):
        return [self.a, self.b]

    def expected_shapes(self, shape):
        d_in, d_out = shape
        return {self.a: (d_out // 2, d_in), self.b: (d_out // 2, d_in)}

    def read(self, get: Reader, index: Index) -> np.ndarray:
        stacked = StackedExperts((self.a,), (self.b,))
        return stacked.read(get, (slice(0, 1), *index))[0]


@dataclass(frozen=True)
class ConvTaps:
    """param [K, C] = tensor[:, 0, :].T: a depthwise Conv1d weight [C, 1, K] as K taps per channel."""

    name: str

    def names(self) -> list[str]:
        return [self.name]

    def expected_shapes(self, shape):
        return {self.name: (shape[1], 1, shape[0])}

    def read(self, get: Reader, index: Index) -> np.ndarray:
        taps, channels = index
        return get(self.name)[channels, 0, taps].T


@dataclass(frozen=True)
class Interleaved:
    """param[..., :F] = tensor[..., 0::2], param[..., F:] = tensor[..., 1::2]: GPT-OSS stores gate and up
    columns interleaved ([E, D, 2F] weights, [E, 2F] biases); moejax keeps them as gate | up halves."""

    name: str

    def names(self) -> list[str]:
        return [self.name]

    def expected_shapes(self, shape):
        return {self.name: shape}

    def read(self, get: Reader, index: Index) -> np.ndarray:
        *lead, out_sl = index
        width = get(self.name).shape[-1]
        cols = np.asarray(range(*out_sl.indices(width)))
        half = width // 2
        return get(self.name)[tuple(lead)][..., np.where(cols < half, 2 * cols, 2 * (cols - half) + 1)]


Source = Transposed | Direct | StackedExperts | FusedExperts | Concat | ConvTaps | Interleaved


def param_sources(cfg: ModelConfig, names: set[str]) -> dict[str, Source]:
    """{moejax param path ("experts.3.w_gate_up"): source} for a checkpoint holding `names`."""
    src: dict[str, Source] = {
        "io.embed": Direct("model.embed_tokens.weight"),
        "io.final_norm.weight": Direct("model.norm.weight"),
    }
    if not cfg.tie_word_embeddings:
        src["io.lm_head"] = Transposed("lm_head.weight")
    for i in range(cfg.num_layers):
        hf, me = f"model.layers.{i}", f"layers.{i}"
        src[f"{me}.input_norm.weight"] = Direct(f"{hf}.input_layernorm.weight")
        src[f"{me}.post_attn_norm.weight"] = Direct(f"{hf}.post_attention_layernorm.weight")
        if cfg.architecture == "gpt_oss":
            src.update(_gpt_oss_moe_sources(f"{hf}.mlp", me, f"experts.{i}"))
        elif cfg.moe_layers[i]:
            src.update(_moe_sources(cfg, names, hf, me, f"experts.{i}"))
        else:
            src.update(_mlp_sources(f"{hf}.mlp", f"{me}.mlp"))
        if cfg.linear_layers[i]:
            src.update(_gated_deltanet_sources(f"{hf}.linear_attn", f"{me}.attn"))
            continue
        if cfg.mla is not None:
            src.update(_mla_sources(cfg, f"{hf}.self_attn", f"{me}.attn"))
            projections = ("o",)
        else:
            projections = ("q", "k", "v", "o")
        for proj in projections:
            src[f"{me}.attn.w_{proj}"] = Transposed(f"{hf}.self_attn.{proj}_proj.weight")
        if cfg.qkv_bias:
            for p in "qkv":
                src[f"{me}.attn.b_{p}"] = Direct(f"{hf}.self_attn.{p}_proj.bias")
        if cfg.o_bias:
            src[f"{me}.attn.b_o"] = Direct(f"{hf}.self_attn.o_proj.bias")
        if cfg.qk_norm != "none":
            src[f"{me}.attn.q_norm.weight"] = Direct(f"{hf}.self_attn.q_norm.weight")
            src[f"{me}.attn.k_norm.weight"] = Direct(f"{hf}.self_attn.k_norm.weight")
        if cfg.attention_sinks:
            src[f"{me}.attn.sinks"] = Direct(f"{hf}.self_attn.sinks")
    return src


def _gated_deltanet_sources(hf: str, me: str) -> dict[str, Source]:
    return {f"{me}.w_qkvz": Transposed(f"{hf}.in_proj_qkvz.weight"), f"{me}.w_ba": Transposed(f"{hf}.in_proj_ba.weight"),
            f"{me}.conv_taps": ConvTaps(f"{hf}.conv1d.weight"), f"{me}.A_log": Direct(f"{hf}.A_log"),
            f"{me}.dt_bias": Direct(f"{hf}.dt_bias"), f"{me}.norm.weight": Direct(f"{hf}.norm.weight"),
            f"{me}.w_out": Transposed(f"{hf}.out_proj.weight")}


def _mla_sources(cfg: ModelConfig, hf: str, me: str) -> dict[str, Source]:
    """DeepSeek's latent attention: q (direct or LoRA), kv down-projection with the rope key, kv up."""
    src: dict[str, Source] = {
        f"{me}.w_kv_a": Transposed(f"{hf}.kv_a_proj_with_mqa.weight"),
        f"{me}.kv_a_norm.weight": Direct(f"{hf}.kv_a_layernorm.weight"),
        f"{me}.w_kv_b": Transposed(f"{hf}.kv_b_proj.weight"),
    }
    if cfg.mla.q_lora_rank is None:
        src[f"{me}.w_q"] = Transposed(f"{hf}.q_proj.weight")
    else:
        src[f"{me}.w_q_a"] = Transposed(f"{hf}.q_a_proj.weight")
        src[f"{me}.q_a_norm.weight"] = Direct(f"{hf}.q_a_layernorm.weight")
        src[f"{me}.w_q_b"] = Transposed(f"{hf}.q_b_proj.weight")
    return src


def _mlp_sources(hf: str, me: str) -> dict[str, Source]:
    return {f"{me}.w_gate_up": Concat(f"{hf}.gate_proj.weight", f"{hf}.up_proj.weight"),
            f"{me}.w_down": Transposed(f"{hf}.down_proj.weight")}


def _moe_sources(cfg: ModelConfig, names: set[str], hf_layer: str, me: str, experts: str) -> dict[str, Source]:
    """Router and shared expert go to the layer (`me`), the routed experts to `experts`."""
    # Mixtral's legacy checkpoints call the block `block_sparse_moe` and the projections w1/w3/w2.
    block = f"{hf_layer}.block_sparse_moe" if f"{hf_layer}.block_sparse_moe.gate.weight" in names \
        else f"{hf_layer}.mlp"
    E = cfg.num_experts
    src: dict[str, Source] = {f"{me}.router.w": Transposed(f"{block}.gate.weight")}
    if f"{block}.experts.gate_up_proj" in names:
        src[f"{experts}.w_gate_up"] = FusedExperts(f"{block}.experts.gate_up_proj")
        src[f"{experts}.w_down"] = FusedExperts(f"{block}.experts.down_proj")
    else:
        gate, up, down = ("w1", "w3", "w2") if block.endswith("block_sparse_moe") else \
            ("gate_proj", "up_proj", "down_proj")
        src[f"{experts}.w_gate_up"] = StackedExperts(tuple(f"{block}.experts.{e}.{gate}.weight" for e in range(E)),
                                                     tuple(f"{block}.experts.{e}.{up}.weight" for e in range(E)))
        src[f"{experts}.w_down"] = StackedExperts(tuple(f"{block}.experts.{e}.{down}.weight" for e in range(E)))
    if cfg.router_score_bias:
        src[f"{me}.router.score_bias"] = Direct(f"{block}.gate.e_score_correction_bias")
    if cfg.shared_expert_intermediate_size:
        shared = "shared_experts" if cfg.architecture.startswith("deepseek") else "shared_expert"
        src.update(_mlp_sources(f"{block}.{shared}", f"{me}.shared_expert"))
    if cfg.shared_expert_gate:
        src[f"{me}.shared_gate"] = Transposed(f"{block}.shared_expert_gate.weight")
    return src


def _gpt_oss_moe_sources(block: str, me: str, experts: str) -> dict[str, Source]:
    """GPT-OSS's biased router and experts (its expert weights are [in, out] already: no transpose)."""
    return {f"{me}.router.w": Transposed(f"{block}.router.weight"), f"{me}.router.b": Direct(f"{block}.router.bias"),
            f"{experts}.w_gate_up": Interleaved(f"{block}.experts.gate_up_proj"),
            f"{experts}.b_gate_up": Interleaved(f"{block}.experts.gate_up_proj_bias"),
            f"{experts}.w_down": Direct(f"{block}.experts.down_proj"),
            f"{experts}.b_down": Direct(f"{block}.experts.down_proj_bias")}


# Tensors a checkpoint may carry that the model recomputes or does not need.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
IGNORED_PREFIXES = ("mtp.",)  # Qwen3-Next's multi-token-prediction module: not used for decoding


def ignored(cfg: ModelConfig, name: str) -> bool:
    """Whether a checkpoint tensor is one moejax does not need: recomputed buffers, and DeepSeek-V3's
    multi-token-prediction module(s) stored as the layers after the last (transformers skips them too),
    Qwen3-Next's (`mtp.*`)."""
    if name.endswith(IGNORED_SUFFIXES) or name.startswith(IGNORED_PREFIXES):
        return True
    extra_layer = re.match(r"model\.layers\.(\d+)\.", name)
    return cfg.architecture == "deepseek_v3" and extra_layer is not None and int(extra_layer[1]) >= cfg.num_layers
