"""Model configuration: one dataclass describes every supported MoE decoder, plus presets.

Architecture quirks are explicit fields (router normalisation, q/k norm kind, shared expert, per-layer
attention window, which layers are MoE), so the model code has no per-architecture branches and the
simulator can cost any preset without building it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

QKNorm = Literal["none", "per_head", "full"]

# Architectures whose weights moejax can load and run (HF `model_type` values).
EXECUTABLE_ARCHITECTURES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss", "deepseek_v2", "deepseek_v3",
                           "qwen3_next")


DTYPES = ("float32", "bfloat16", "float16")  # parameter / compute dtypes a model can run in


class ConfigError(ValueError):
    """A model config is malformed or unsupported; the message names the offending field."""


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters, as HF's `rope_parameters` / `rope_scaling` describe them."""

    theta: float = 10000.0
    kind: Literal["default", "linear", "llama3", "yarn"] = "default"
    factor: float = 1.0
    original_max_position: int | None = None
    # llama3
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    # yarn
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True


@dataclass(frozen=True)
class MLAShape:
    """Multi-head latent attention (DeepSeek-V2/V3): low-rank q and kv projections; the cache keeps
    the kv latent plus the shared rope key per token."""

    q_lora_rank: int | None  # None: q projected from the hidden rows directly (DeepSeek-V2-Lite)
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope_interleave: bool = True  # rope rotates pairs (x0, x1), (x2, x3), ... (DeepSeek) vs the two halves

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def attn_params(self, hidden: int, heads: int) -> int:
        qk = self.qk_head_dim
        q = hidden * heads * qk if self.q_lora_rank is None else \
            hidden * self.q_lora_rank + self.q_lora_rank * heads * qk + self.q_lora_rank  # down, up, norm
        return (q + hidden * (self.kv_lora_rank + self.qk_rope_head_dim)  # kv down (+ rope key)
                + self.kv_lora_rank * heads * (self.qk_nope_head_dim + self.v_head_dim)  # kv up
                + heads * self.v_head_dim * hidden  # o
                + self.kv_lora_rank + 2 * hidden)  # norms

    @property
    def kv_elems_per_token(self) -> int:
        return self.kv_lora_rank + self.qk_rope_head_dim


@dataclass(frozen=True)
class GatedDeltaNetShape:
    """Gated DeltaNet linear attention (Qwen3-Next): q and k in num_key_heads heads of key_head_dim,
    v in num_value_heads heads of value_head_dim (each key head serves num_value_heads // num_key_heads
    value heads), a causal depthwise conv of conv_kernel taps over [q | k | v]. Per request a layer
    keeps a fixed-size state, not per-token KV: the recurrent state [value heads, key_head_dim,
    value_head_dim] (fp32) and the conv's last conv_kernel - 1 inputs (model dtype)."""

    num_key_heads: int
    num_value_heads: int
    key_head_dim: int
    value_head_dim: int
    conv_kernel: int = 4

    @property
    def key_dim(self) -> int:
        return self.num_key_heads * self.key_head_dim

    @property
    def value_dim(self) -> int:
        return self.num_value_heads * self.value_head_dim

    @property
    def conv_dim(self) -> int:
        """Channels of the conv: q, k and v side by side."""
        return 2 * self.key_dim + self.value_dim

    @property
    def recurrent_state_elems(self) -> int:
        return self.num_value_heads * self.key_head_dim * self.value_head_dim

    @property
    def conv_state_elems(self) -> int:
        return (self.conv_kernel - 1) * self.conv_dim

    def attn_params(self, hidden: int) -> int:
        return (hidden * (2 * self.key_dim + 2 * self.value_dim)  # q, k, v, z projection
                + hidden * 2 * self.num_value_heads  # beta and decay-rate projection
                + self.conv_kernel * self.conv_dim  # conv taps
                + 2 * self.num_value_heads + self.value_head_dim  # A_log, dt_bias, gated norm
                + self.value_dim * hidden  # out projection
                + 2 * hidden)  # the layer's two norms


RECURRENT_STATE_BYTES = 4  # Gated DeltaNet recurrent states are kept in fp32: they accumulate over the whole sequence


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and quirks of a MoE decoder. Sizes: D = hidden, F = expert intermediate, E = experts."""

    name: str
    architecture: str  # HF model_type; "dense"/"mla"-style presets exist for the simulator only
    vocab_size: int
    hidden_size: int  # D
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position: int = 4096
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = field(default_factory=RopeConfig)
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: QKNorm = "none"  # per_head: RMSNorm over head_dim (Qwen3); full: over the projection (OLMoE)
    clip_qkv: float | None = None  # OLMoE clamps q, k, v to [-c, c]
    attention_sinks: bool = False  # GPT-OSS: a learned logit per head joins each softmax denominator
    # Attention window per layer (None = full attention); hybrid models mix both.
    sliding_windows: tuple[int | None, ...] = ()
    # MoE
    num_experts: int = 0  # E; 0 = a dense model
    num_experts_per_tok: int = 0  # top-k
    moe_intermediate_size: int = 0  # F
    norm_topk_prob: bool = True  # renormalise the top-k softmax probabilities to sum to 1
    router_bias: bool = False  # GPT-OSS: the router's logits have a bias
    expert_bias: bool = False  # GPT-OSS: routed experts' gate/up and down projections have biases
    # GPT-OSS's clamped SwiGLU in the routed experts (None: plain SwiGLU): gate <= limit,
    # |up| <= limit, (up + 1) * gate * sigmoid(alpha * gate)
    swiglu_limit: float | None = None
    swiglu_alpha: float = 1.702
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE shared expert; 0 = none
    shared_expert_gate: bool = False  # sigmoid(x @ w) scales the shared expert (Qwen2-MoE)
    dense_intermediate_size: int = 0  # MLP width of the non-MoE layers
    moe_layers: tuple[bool, ...] = ()  # per layer: MoE block (True) or dense MLP (False)
    # Routing beyond softmax top-k (DeepSeek): scores, grouped top-k, scaled weights.
    router_scoring: Literal["softmax", "sigmoid"] = "softmax"  # sigmoid: DeepSeek-V3
    router_groups: int = 1  # experts form this many equal groups (n_group)
    router_topk_groups: int = 1  # a row picks its experts within its best groups only (topk_group)
    router_group_score: Literal["max", "top2_sum"] = "max"  # a group's score: its best expert (V2), best two (V3)
    router_score_bias: bool = False  # a learned per-expert bias added to the scores for choosing only (V3)
    routed_scaling_factor: float = 1.0  # multiplies the routed experts' weights
    router_fp32: bool = False  # router logits from fp32 rows and weights (DeepSeek) rather than the model dtype
    # Multi-head latent attention (DeepSeek) instead of GQA; head_dim is then the q/k head width.
    mla: MLAShape | None = None
    # Gated DeltaNet linear attention (Qwen3-Next) in the layers `linear_layers` marks, attention in the others.
    linear_attention: GatedDeltaNetShape | None = None
    linear_layers: tuple[bool, ...] = ()  # per layer: Gated DeltaNet (True) or attention (False)
    partial_rotary_factor: float = 1.0  # RoPE rotates the first head_dim * factor dims of q and k (Qwen3-Next)
    attn_output_gate: bool = False  # q projection carries a per-head gate: out *= sigmoid(gate) (Qwen3-Next)
    zero_centered_norm: bool = False  # RMSNorm weights w scale by (1 + w), so they train around 0 (Qwen3-Next)
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if not self.sliding_windows:
            object.__setattr__(self, "sliding_windows", (None,) * self.num_layers)
        if not self.moe_layers:
            object.__setattr__(self, "moe_layers", (self.num_experts > 0,) * self.num_layers)
        if not self.linear_layers:
            object.__setattr__(self, "linear_layers", (False,) * self.num_layers)
        validate(self)

    # --- derived quantities used by the model, the executors and the cost model -------------------
    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def num_moe_layers(self) -> int:
        return sum(self.moe_layers)

    @property
    def rotary_dim(self) -> int:
        """Dims of each q/k head that RoPE rotates (the first ones)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def has_state_slots(self) -> bool:
        """Whether a request keeps a fixed-size state slot (Gated DeltaNet layers) beside its KV blocks."""
        return any(self.linear_layers)

    @property
    def attention_kind(self) -> str:
        return "gqa" if self.mla is None else "mla"

    @property
    def executable(self) -> bool:
        return self.architecture in EXECUTABLE_ARCHITECTURES

    @property
    def dtype_bytes(self) -> int:
        return 4 if self.dtype == "float32" else 2

    def expert_params(self) -> int:
        """Parameters of one routed expert (SwiGLU: gate, up, down; and their biases)."""
        D, F = self.hidden_size, self.moe_intermediate_size
        return 3 * D * F + (2 * F + D if self.expert_bias else 0)

    def kv_elems_per_token(self, layer: int) -> int:
        """K+V elements one token keeps in the cache of `layer` (none in a Gated DeltaNet layer)."""
        if self.linear_layers[layer]:
            return 0
        if self.mla is not None:
            return self.mla.kv_elems_per_token
        return 2 * self.kv_size

    def state_bytes(self, layer: int) -> int:
        """Bytes of one request's fixed-size state in `layer`: a Gated DeltaNet layer's recurrent
        state (fp32) and conv state (model dtype); 0 for attention layers."""
        if not self.linear_layers[layer]:
            return 0
        s = self.linear_attention
        return s.recurrent_state_elems * RECURRENT_STATE_BYTES + s.conv_state_elems * self.dtype_bytes

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """Inverse of to_dict (JSON turns tuples into lists; they come back as tuples)."""
        d = dict(d)
        d["rope"] = RopeConfig(**d.get("rope", {}))
        if d.get("mla"):
            d["mla"] = MLAShape(**d["mla"])
        if d.get("linear_attention"):
            d["linear_attention"] = GatedDeltaNetShape(**d["linear_attention"])
        for k in ("sliding_windows", "moe_layers", "linear_layers", "eos_token_ids"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


def validate(cfg: ModelConfig) -> None:
    def need(cond: bool, field_name: str, msg: str) -> None:
        if not cond:
            raise ConfigError(f"{cfg.name}: {field_name}: {msg}")

    for f in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
        need(getattr(cfg, f) > 0, f, f"must be positive, got {getattr(cfg, f)}")
    need(cfg.num_heads % cfg.num_kv_heads == 0, "num_kv_heads",
         f"num_heads={cfg.num_heads} is not a multiple of num_kv_heads={cfg.num_kv_heads}")
    need(len(cfg.sliding_windows) == cfg.num_layers, "sliding_windows",
         f"has {len(cfg.sliding_windows)} entries for {cfg.num_layers} layers")
    need(len(cfg.moe_layers) == cfg.num_layers, "moe_layers",
         f"has {len(cfg.moe_layers)} entries for {cfg.num_layers} layers")
    if any(cfg.moe_layers):
        need(cfg.num_experts > 0, "num_experts", "must be positive when any layer is MoE")
        need(0 < cfg.num_experts_per_tok <= cfg.num_experts, "num_experts_per_tok",
             f"must be in [1, num_experts={cfg.num_experts}], got {cfg.num_experts_per_tok}")
        need(cfg.moe_intermediate_size > 0, "moe_intermediate_size", "must be positive")
    if not all(cfg.moe_layers):
        need(cfg.dense_intermediate_size > 0, "dense_intermediate_size",
             "must be positive when some layers are dense")
    need(cfg.qk_norm in ("none", "per_head", "full"), "qk_norm", f"unknown kind {cfg.qk_norm!r}")
    need(cfg.rope.kind in ("default", "linear", "llama3", "yarn"), "rope.kind",
         f"unsupported RoPE type {cfg.rope.kind!r} (supported: default, linear, llama3, yarn)")
    if cfg.rope.kind in ("llama3", "yarn"):
        need(cfg.rope.original_max_position is not None, "rope.original_max_position",
             f"required for RoPE type {cfg.rope.kind!r}")
    need(cfg.dtype in DTYPES, "dtype", f"unsupported dtype {cfg.dtype!r}")
    need(len(cfg.linear_layers) == cfg.num_layers, "linear_layers",
         f"has {len(cfg.linear_layers)} entries for {cfg.num_layers} layers")
    need(0 < cfg.partial_rotary_factor <= 1, "partial_rotary_factor",
         f"must be in (0, 1], got {cfg.partial_rotary_factor}")
    need(cfg.rotary_dim > 0 and cfg.rotary_dim % 2 == 0, "partial_rotary_factor",
         f"rotates {cfg.rotary_dim} of head_dim={cfg.head_dim} dims; RoPE needs an even, positive number")
    if any(cfg.linear_layers):
        s = cfg.linear_attention
        need(s is not None, "linear_attention", "the Gated DeltaNet shape is required when linear_layers marks a layer")
        for f in ("num_key_heads", "num_value_heads", "key_head_dim", "value_head_dim", "conv_kernel"):
            need(getattr(s, f) > 0, f"linear_attention.{f}", f"must be positive, got {getattr(s, f)}")
        need(s.num_value_heads % s.num_key_heads == 0, "linear_attention.num_value_heads",
             f"num_value_heads={s.num_value_heads} is not a multiple of num_key_heads={s.num_key_heads}")
        need(cfg.mla is None, "linear_attention", "Gated DeltaNet layers beside MLA attention are not supported")
        need(all(w is None for lin, w in zip(cfg.linear_layers, cfg.sliding_windows) if lin), "sliding_windows",
             "a Gated DeltaNet layer has no attention window (None for its layers)")
    need(cfg.router_scoring in ("softmax", "sigmoid"), "router_scoring",
         f"unknown scoring {cfg.router_scoring!r} (softmax, sigmoid)")
    need(cfg.router_group_score in ("max", "top2_sum"), "router_group_score",
         f"unknown group score {cfg.router_group_score!r} (max, top2_sum)")
    need(cfg.routed_scaling_factor > 0, "routed_scaling_factor", f"must be positive, got {cfg.routed_scaling_factor}")
    G = cfg.router_groups
    need(G >= 1 and (cfg.num_experts % G == 0 if cfg.num_experts else G == 1), "router_groups",
         f"{G} groups do not split num_experts={cfg.num_experts} evenly")
    need(1 <= cfg.router_topk_groups <= G, "router_topk_groups",
         f"must be in [1, router_groups={G}], got {cfg.router_topk_groups}")
    if cfg.num_experts and G > 1:
        per_group = cfg.num_experts // G
        need(cfg.num_experts_per_tok <= cfg.router_topk_groups * per_group, "num_experts_per_tok",
             f"{cfg.num_experts_per_tok} experts do not fit in router_topk_groups={cfg.router_topk_groups} "
             f"groups of {per_group}")
        need(cfg.router_group_score != "top2_sum" or per_group >= 2, "router_group_score",
             f"top2_sum needs groups of at least 2 experts, got {per_group}")
    if cfg.mla is not None:
        m = cfg.mla
        for f in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            need(getattr(m, f) > 0, f"mla.{f}", f"must be positive, got {getattr(m, f)}")
        need(m.q_lora_rank is None or m.q_lora_rank > 0, "mla.q_lora_rank",
             f"must be positive or None (no q LoRA), got {m.q_lora_rank}")
        need(m.qk_rope_head_dim % 2 == 0, "mla.qk_rope_head_dim", f"rope needs an even width, got {m.qk_rope_head_dim}")
        need(cfg.head_dim == m.qk_head_dim, "head_dim",
             f"is the q/k head width under MLA: qk_nope_head_dim + qk_rope_head_dim = {m.qk_head_dim}, "
             f"got {cfg.head_dim}")
        need(cfg.num_kv_heads == cfg.num_heads, "num_kv_heads",
             f"must equal num_heads={cfg.num_heads} under MLA (every head reads the one latent), "
             f"got {cfg.num_kv_heads}")
        for f in ("qkv_bias", "o_bias", "clip_qkv", "attention_sinks"):
            need(not getattr(cfg, f), f, "is a grouped-query attention option; MLA has none")
        need(all(w is None for w in cfg.sliding_windows), "sliding_windows",
             "MLA attends over the whole context (no sliding windows)")
        need(cfg.qk_norm == "none", "qk_norm", "is a grouped-query attention option; MLA has none")
    for i, w in enumerate(cfg.sliding_windows):
        need(w is None or w > 0, "sliding_windows", f"layer {i}: a window must be positive (None: full attention), got {w}")
    if cfg.swiglu_limit is not None:
        need(cfg.swiglu_limit > 0, "swiglu_limit", f"must be positive, got {cfg.swiglu_limit}")


# --- HF config.json ------------------------------------------------------------------------------

def _first(d: dict, *keys: str, default: Any = None) -> Any:
    """The value of the first key present: transformers spells several fields two ways."""
    for k in keys:
        if k in d and d[k] is not None:
            return d[k]
    return default


def _rope_from_hf(hf: dict) -> RopeConfig:
    # transformers >= 5 writes `rope_parameters` (theta inside); older configs write a top-level
    # `rope_theta` and an optional `rope_scaling` dict ("type" or "rope_type").
    params = dict(_first(hf, "rope_parameters", default={}) or {})
    scaling = dict(_first(hf, "rope_scaling", default={}) or {})
    params = {**scaling, **params}
    theta = float(_first(params, "rope_theta", default=_first(hf, "rope_theta", default=10000.0)))
    kind = _first(params, "rope_type", "type", default="default")
    if kind not in ("default", "linear", "llama3", "yarn"):
        raise ConfigError(f"rope_parameters.rope_type: unsupported RoPE type {kind!r} "
                          "(supported: default, linear, llama3, yarn)")
    factor = params.get("factor")
    if factor is None and kind == "yarn" and params.get("original_max_position_embeddings"):
        # DeepSeek-V3 style: the extension ratio is max_position_embeddings / the pretraining length
        factor = _first(hf, "max_position_embeddings", default=4096) / params["original_max_position_embeddings"]
    return RopeConfig(
        theta=theta,
        kind=kind,
        factor=float(1.0 if factor is None else factor),
        original_max_position=params.get("original_max_position_embeddings"),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        attention_factor=params.get("attention_factor"),
        mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"),
        truncate=bool(params.get("truncate", True)),
    )


def _require(hf: dict, *keys: str) -> Any:
    value = _first(hf, *keys)
    if value is None:
        raise ConfigError(f"config.json: missing field {' / '.join(keys)}")
    return value


def from_hf_config(hf: dict, name: str = "checkpoint") -> ModelConfig:
    """Translate a HF `config.json` dict into a ModelConfig, rejecting what moejax cannot run."""
    arch = hf.get("model_type")
    if arch not in EXECUTABLE_ARCHITECTURES:
        archs = hf.get("architectures")
        raise ConfigError(
            f"config.json: model_type {arch!r} (architectures={archs}) is not supported; "
            f"supported: {', '.join(EXECUTABLE_ARCHITECTURES)}")
    hidden = int(_require(hf, "hidden_size"))
    num_heads = int(_require(hf, "num_attention_heads"))
    num_layers = int(_require(hf, "num_hidden_layers"))
    num_experts = int(_require(hf, "num_local_experts", "num_experts", "n_routed_experts"))
    head_dim = int(_first(hf, "head_dim", default=hidden // num_heads))
    dtype = str(_first(hf, "dtype", "torch_dtype", default="bfloat16")).replace("torch.", "")
    if dtype not in DTYPES:
        raise ConfigError(f"config.json: dtype {dtype!r} is not supported (float32, bfloat16, float16)")

    window = _first(hf, "sliding_window")
    if arch == "qwen2_moe":
        # Qwen2-MoE applies its window only to the layers `layer_types` marks as sliding.
        types = hf.get("layer_types") or ["full_attention"] * num_layers
        if not hf.get("use_sliding_window", False):
            types = ["full_attention"] * num_layers
        windows = tuple(int(window) if t == "sliding_attention" and window else None for t in types)
    elif arch == "gpt_oss":
        # GPT-OSS alternates sliding (even layers, by default) and full attention (`layer_types`).
        types = hf.get("layer_types") or ["sliding_attention" if i % 2 == 0 else "full_attention"
                                          for i in range(num_layers)]
        if len(types) != num_layers:
            raise ConfigError(f"config.json: layer_types has {len(types)} entries for {num_layers} layers")
        unknown = sorted(set(types) - {"sliding_attention", "full_attention"})
        if unknown:
            raise ConfigError(f"config.json: layer_types: unsupported layer types {unknown} "
                              "(gpt_oss: sliding_attention, full_attention)")
        if "sliding_attention" in types and not window:
            raise ConfigError("config.json: layer_types has sliding_attention layers but sliding_window is not set")
        windows = tuple(int(window) if t == "sliding_attention" else None for t in types)
    elif arch == "olmoe":
        windows = (None,) * num_layers
    else:
        windows = (int(window) if window else None,) * num_layers

    moe_layers: tuple[bool, ...]
    if arch in ("qwen2_moe", "qwen3_moe", "qwen3_next"):
        step = int(hf.get("decoder_sparse_step", 1) or 1)
        dense = set(hf.get("mlp_only_layers") or [])
        moe_layers = tuple(i not in dense and num_experts > 0 and (i + 1) % step == 0
                           for i in range(num_layers))
    elif arch in ("deepseek_v2", "deepseek_v3"):
        first_dense, freq = int(hf.get("first_k_dense_replace") or 0), int(hf.get("moe_layer_freq") or 1)
        moe_layers = tuple(i >= first_dense and i % freq == 0 for i in range(num_layers))
    else:
        moe_layers = (True,) * num_layers

    quant = (hf.get("quantization_config") or {}).get("quant_method")
    if quant:
        raise ConfigError(f"config.json: quantization_config.quant_method {quant!r}: quantised checkpoints are not "
                          "supported; dequantise them first (for GPT-OSS's MXFP4 experts: transformers' "
                          "Mxfp4Config(dequantize=True), then save_pretrained)")
    eos = hf.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
    if arch.startswith("deepseek"):
        quirks = _deepseek_fields(hf, arch)
        head_dim, num_kv_heads = quirks.pop("head_dim"), num_heads
    else:
        num_kv_heads = int(_first(hf, "num_key_value_heads", default=num_heads))
        quirks = _qwen3_next_quirks(hf, num_layers) if arch == "qwen3_next" else _quirks(hf, arch)
    return ModelConfig(
        name=name,
        architecture=arch,
        vocab_size=int(_require(hf, "vocab_size")),
        hidden_size=hidden,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        max_position=int(_first(hf, "max_position_embeddings", default=4096)),
        rms_norm_eps=float(_first(hf, "rms_norm_eps", default=1e-6)),
        rope=_rope_from_hf(hf),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        sliding_windows=windows,
        num_experts=num_experts,
        num_experts_per_tok=int(_require(hf, "num_experts_per_tok")),
        moe_intermediate_size=int(_first(hf, "moe_intermediate_size", "intermediate_size")
                                  if arch != "mixtral" else _require(hf, "intermediate_size")),
        dense_intermediate_size=int(_first(hf, "intermediate_size", default=0)),
        moe_layers=moe_layers,
        dtype=dtype,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos_ids,
        **quirks,
    )


def _qwen3_next_quirks(hf: dict, num_layers: int) -> dict[str, Any]:
    """Qwen3-Next: Gated DeltaNet layers (`layer_types`, or every `full_attention_interval`-th layer
    attention), gated attention with partial RoPE, zero-centred norms, a gated shared expert."""
    types = hf.get("layer_types") or ["full_attention" if (i + 1) % int(hf.get("full_attention_interval", 4)) == 0
                                      else "linear_attention" for i in range(num_layers)]
    unknown = sorted(set(types) - {"linear_attention", "full_attention"})
    if len(types) != num_layers or unknown:
        raise ConfigError(f"config.json: layer_types must name linear_attention or full_attention for each of "
                          f"the {num_layers} layers; got {len(types)} entries" + (f", unknown {unknown}" if unknown else ""))
    # transformers >= 5 keeps the factor in rope_parameters, older configs at the top level; 0.25 is its default
    rope = _first(hf, "rope_parameters", default={}) or {}
    shared = int(_require(hf, "shared_expert_intermediate_size"))
    return dict(
        qkv_bias=bool(hf.get("attention_bias", False)), o_bias=bool(hf.get("attention_bias", False)),
        qk_norm="per_head", norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
        shared_expert_intermediate_size=shared, shared_expert_gate=shared > 0,
        partial_rotary_factor=float(_first(rope, "partial_rotary_factor",
                                           default=_first(hf, "partial_rotary_factor", default=0.25))),
        attn_output_gate=True, zero_centered_norm=True,
        linear_attention=GatedDeltaNetShape(
            num_key_heads=int(_require(hf, "linear_num_key_heads")),
            num_value_heads=int(_require(hf, "linear_num_value_heads")),
            key_head_dim=int(_require(hf, "linear_key_head_dim")),
            value_head_dim=int(_require(hf, "linear_value_head_dim")),
            conv_kernel=int(_first(hf, "linear_conv_kernel_dim", default=4))),
        linear_layers=tuple(t == "linear_attention" for t in types))
def _quirks(hf: dict, arch: str) -> dict[str, Any]:
    return {
        "mixtral": dict(norm_topk_prob=True),
        "qwen2_moe": dict(
            qkv_bias=bool(hf.get("qkv_bias", True)),
            norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
            shared_expert_intermediate_size=int(hf.get("shared_expert_intermediate_size", 0)),
            shared_expert_gate=int(hf.get("shared_expert_intermediate_size", 0)) > 0),
        "qwen3_moe": dict(
            qkv_bias=bool(hf.get("attention_bias", False)), o_bias=bool(hf.get("attention_bias", False)),
            qk_norm="per_head", norm_topk_prob=bool(hf.get("norm_topk_prob", False))),
        "olmoe": dict(
            qkv_bias=bool(hf.get("attention_bias", False)), o_bias=bool(hf.get("attention_bias", False)),
            qk_norm="full", clip_qkv=hf.get("clip_qkv"), norm_topk_prob=bool(hf.get("norm_topk_prob", False))),
        # GPT-OSS's router takes the softmax over its k largest (biased) logits: the renormalised
        # top-k of the full softmax, i.e. norm_topk_prob.
        "gpt_oss": dict(
            qkv_bias=bool(hf.get("attention_bias", True)), o_bias=bool(hf.get("attention_bias", True)),
            attention_sinks=True, norm_topk_prob=True, router_bias=True, expert_bias=True,
            swiglu_limit=float(hf.get("swiglu_limit", 7.0)), swiglu_alpha=float(hf.get("swiglu_alpha", 1.702))),
    }[arch]


def _deepseek_fields(hf: dict, arch: str) -> dict[str, Any]:
    """MLA shape, shared experts and routing of a DeepSeek-V2/V3 config.json, as transformers 5.23
    runs them (the reference the parity fixtures hold moejax to)."""
    if hf.get("attention_bias"):
        raise ConfigError(f"config.json: attention_bias=True is not supported for {arch} "
                          "(no released DeepSeek checkpoint has attention biases)")
    mla = MLAShape(
        q_lora_rank=None if hf.get("q_lora_rank") is None else int(hf["q_lora_rank"]),
        kv_lora_rank=int(_require(hf, "kv_lora_rank")), qk_nope_head_dim=int(_require(hf, "qk_nope_head_dim")),
        qk_rope_head_dim=int(_require(hf, "qk_rope_head_dim")), v_head_dim=int(_require(hf, "v_head_dim")),
        rope_interleave=bool(hf.get("rope_interleave", True)) if arch == "deepseek_v3" else True)
    groups, topk_groups = int(hf.get("n_group") or 1), int(hf.get("topk_group") or 1)
    if arch == "deepseek_v2":
        method, scoring = hf.get("topk_method") or "greedy", hf.get("scoring_func") or "softmax"
        if method not in ("greedy", "group_limited_greedy") or scoring != "softmax":
            raise ConfigError(f"config.json: topk_method {method!r} with scoring_func {scoring!r} is not supported "
                              "for deepseek_v2 (greedy or group_limited_greedy, softmax)")
        if method == "greedy":  # plain top-k: groups play no part
            groups, topk_groups = 1, 1
        # transformers' DeepseekV2 never renormalises the top-k weights (norm_topk_prob is unused)
        routing = dict(router_scoring="softmax", router_group_score="max", norm_topk_prob=False)
    else:
        method, scoring = hf.get("topk_method") or "noaux_tc", hf.get("scoring_func") or "sigmoid"
        if method != "noaux_tc" or scoring != "sigmoid":
            raise ConfigError(f"config.json: topk_method {method!r} with scoring_func {scoring!r} is not supported "
                              "for deepseek_v3 (noaux_tc, sigmoid)")
        routing = dict(router_scoring="sigmoid", router_group_score="top2_sum", router_score_bias=True,
                       norm_topk_prob=bool(hf.get("norm_topk_prob", True)))
    return dict(
        head_dim=mla.qk_head_dim, mla=mla,
        shared_expert_intermediate_size=int(hf.get("n_shared_experts") or 0) * int(_require(hf, "moe_intermediate_size")),
        router_groups=groups, router_topk_groups=topk_groups, router_fp32=True,
        routed_scaling_factor=float(hf.get("routed_scaling_factor") or 1.0), **routing)


def load_hf_config(checkpoint_dir: str | Path) -> ModelConfig:
    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{checkpoint_dir}: no config.json (expected a HF checkpoint directory)")
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    return from_hf_config(hf, name=Path(checkpoint_dir).name)


# --- presets ---------------------------------------------------------------------------------------

def _qwen3(name, D, L, H, KV, E, K, F, **kw) -> ModelConfig:
    return ModelConfig(name=name, architecture="qwen3_moe", vocab_size=kw.pop("vocab_size", 151936),
                       hidden_size=D, num_layers=L, num_heads=H, num_kv_heads=KV,
                       head_dim=kw.pop("head_dim", 128), max_position=kw.pop("max_position", 40960),
                       rope=RopeConfig(theta=kw.pop("theta", 1e6)), qk_norm="per_head",
                       num_experts=E, num_experts_per_tok=K, moe_intermediate_size=F,
                       norm_topk_prob=True, **kw)


def _qwen3_next(name, D, L, H, KV, hd, linear: GatedDeltaNetShape, E, K, F, shared, **kw) -> ModelConfig:
    """Qwen3-Next: three Gated DeltaNet layers to one gated-attention layer, partial RoPE (a quarter of
    each head), zero-centred norms, a sigmoid-gated shared expert beside the routed ones."""
    return ModelConfig(name=name, architecture="qwen3_next", hidden_size=D, num_layers=L, num_heads=H,
                       num_kv_heads=KV, head_dim=hd, qk_norm="per_head", partial_rotary_factor=0.25,
                       attn_output_gate=True, zero_centered_norm=True, linear_attention=linear,
                       linear_layers=tuple((i + 1) % 4 != 0 for i in range(L)), num_experts=E,
                       num_experts_per_tok=K, moe_intermediate_size=F, norm_topk_prob=True,
                       shared_expert_intermediate_size=shared, shared_expert_gate=True, **kw)
def _deepseek(name, arch, V, D, L, H, q_lora, E, K, F, shared, dense_F, first_dense, scale, yarn,
              kv_lora=512, nope=128, rope=64, v=128, groups=(1, 1), orig=4096, max_position=163840,
              bos=None, eos=None, dtype="bfloat16") -> ModelConfig:
    """DeepSeek-V2 (softmax, group-limited greedy) or -V3 (sigmoid + bias, top-2-sum groups) with YaRN
    rope; yarn = (mscale, mscale_all_dim)."""
    v3 = arch == "deepseek_v3"
    return ModelConfig(
        name=name, architecture=arch, vocab_size=V, hidden_size=D, num_layers=L, num_heads=H, num_kv_heads=H,
        head_dim=nope + rope, max_position=max_position,
        rope=RopeConfig(theta=10000.0, kind="yarn", factor=max_position / orig, original_max_position=orig,
                        mscale=yarn[0], mscale_all_dim=yarn[1]),
        mla=MLAShape(q_lora_rank=q_lora, kv_lora_rank=kv_lora, qk_nope_head_dim=nope, qk_rope_head_dim=rope,
                     v_head_dim=v),
        num_experts=E, num_experts_per_tok=K, moe_intermediate_size=F, norm_topk_prob=v3,
        shared_expert_intermediate_size=shared * F, dense_intermediate_size=dense_F,
        moe_layers=(False,) * first_dense + (True,) * (L - first_dense),
        router_scoring="sigmoid" if v3 else "softmax", router_groups=groups[0], router_topk_groups=groups[1],
        router_group_score="top2_sum" if v3 else "max", router_score_bias=v3, routed_scaling_factor=scale,
        router_fp32=True, dtype=dtype, bos_token_id=bos, eos_token_ids=() if eos is None else (eos,))


def _gpt_oss(name, L, E, K=4, D=2880, H=64, KV=8, F=2880, window=128, **kw) -> ModelConfig:
    """GPT-OSS (published configs): sliding-window (even layers) / full attention with sinks, YaRN
    RoPE, biased router and experts, clamped SwiGLU."""
    return ModelConfig(name=name, architecture="gpt_oss", vocab_size=kw.pop("vocab_size", 201088), hidden_size=D,
                       num_layers=L, num_heads=H, num_kv_heads=KV, head_dim=kw.pop("head_dim", 64),
                       max_position=kw.pop("max_position", 131072), rms_norm_eps=1e-5,
                       rope=kw.pop("rope", RopeConfig(theta=150000.0, kind="yarn", factor=32.0,
                                                      original_max_position=4096, truncate=False)),
                       sliding_windows=tuple(window if i % 2 == 0 else None for i in range(L)),
                       qkv_bias=True, o_bias=True, attention_sinks=True, num_experts=E, num_experts_per_tok=K,
                       moe_intermediate_size=F, norm_topk_prob=True, router_bias=True, expert_bias=True,
                       swiglu_limit=7.0, swiglu_alpha=1.702, eos_token_ids=kw.pop("eos_token_ids", (200002,)), **kw)


PRESETS: dict[str, ModelConfig] = {}


def _register(*cfgs: ModelConfig) -> None:
    for c in cfgs:
        PRESETS[c.name] = c


_register(
    # Real architectures' shapes (the simulator costs them; loading their weights needs the checkpoint).
    ModelConfig(name="mixtral-8x7b", architecture="mixtral", vocab_size=32000, hidden_size=4096,
                num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, max_position=32768,
                rms_norm_eps=1e-5, rope=RopeConfig(theta=1e6), num_experts=8, num_experts_per_tok=2,
                moe_intermediate_size=14336),
    ModelConfig(name="mixtral-8x22b", architecture="mixtral", vocab_size=32768, hidden_size=6144,
                num_layers=56, num_heads=48, num_kv_heads=8, head_dim=128, max_position=65536,
                rms_norm_eps=1e-5, rope=RopeConfig(theta=1e6), num_experts=8, num_experts_per_tok=2,
                moe_intermediate_size=16384),
    _qwen3("qwen3-30b-a3b", D=2048, L=48, H=32, KV=4, E=128, K=8, F=768),
    _qwen3("qwen3-235b-a22b", D=4096, L=94, H=64, KV=4, E=128, K=8, F=1536),
    # Qwen/Qwen3-Next-80B-A3B-Instruct's published config.json
    _qwen3_next("qwen3-next-80b-a3b", D=2048, L=48, H=16, KV=2, hd=256,
                linear=GatedDeltaNetShape(num_key_heads=16, num_value_heads=32, key_head_dim=128, value_head_dim=128),
                E=512, K=10, F=512, shared=512, vocab_size=151936, max_position=262144, rope=RopeConfig(theta=1e7),
                bos_token_id=151643, eos_token_ids=(151645,)),
    ModelConfig(name="qwen2-57b-a14b", architecture="qwen2_moe", vocab_size=151936, hidden_size=3584,
                num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128, max_position=32768,
                rope=RopeConfig(theta=1e6), qkv_bias=True, num_experts=64, num_experts_per_tok=8,
                moe_intermediate_size=2560, norm_topk_prob=False, shared_expert_intermediate_size=20480,
                shared_expert_gate=True),
    ModelConfig(name="qwen1.5-moe-a2.7b", architecture="qwen2_moe", vocab_size=151936, hidden_size=2048,
                num_layers=24, num_heads=16, num_kv_heads=16, head_dim=128, max_position=8192,
                qkv_bias=True, num_experts=60, num_experts_per_tok=4, moe_intermediate_size=1408,
                norm_topk_prob=False, shared_expert_intermediate_size=5632, shared_expert_gate=True),
    ModelConfig(name="olmoe-1b-7b", architecture="olmoe", vocab_size=50304, hidden_size=2048,
                num_layers=16, num_heads=16, num_kv_heads=16, head_dim=128, max_position=4096,
                rms_norm_eps=1e-5, qk_norm="full", num_experts=64, num_experts_per_tok=8,
                moe_intermediate_size=1024, norm_topk_prob=False),
    _gpt_oss("gpt-oss-20b", L=24, E=32),
    _gpt_oss("gpt-oss-120b", L=36, E=128),
    # DeepSeek (MLA, shared experts, first-k dense layers, grouped routing), from their published configs.
    _deepseek("deepseek-v2-lite", "deepseek_v2", V=102400, D=2048, L=27, H=16, q_lora=None, E=64, K=6, F=1408,
              shared=2, dense_F=10944, first_dense=1, scale=1.0, yarn=(0.707, 0.707), bos=100000, eos=100001),
    _deepseek("deepseek-v2", "deepseek_v2", V=102400, D=5120, L=60, H=128, q_lora=1536, E=160, K=6, F=1536,
              shared=2, dense_F=12288, first_dense=1, groups=(8, 3), scale=16.0, yarn=(0.707, 0.707),
              bos=100000, eos=100001),
    _deepseek("deepseek-v3", "deepseek_v3", V=129280, D=7168, L=61, H=128, q_lora=1536, E=256, K=8, F=2048,
              shared=1, dense_F=18432, first_dense=3, groups=(8, 4), scale=2.5, yarn=(1.0, 1.0), bos=0, eos=1),
    # A dense reference (no experts): layered prefill should not help it.
    ModelConfig(name="qwen3-8b", architecture="qwen3", vocab_size=151936, hidden_size=4096, num_layers=36,
                num_heads=32, num_kv_heads=8, head_dim=128, max_position=40960,
                rope=RopeConfig(theta=1e6), qk_norm="per_head", dense_intermediate_size=12288),
    # Tiny models with seeded random weights: build in seconds on CPU; the embedded default.
    _qwen3("tiny-qwen3-moe", D=128, L=4, H=4, KV=2, E=16, K=4, F=64, vocab_size=512, head_dim=32,
           max_position=2048, dtype="float32"),
    _qwen3_next("tiny-qwen3-next", D=128, L=4, H=4, KV=2, hd=32,
                linear=GatedDeltaNetShape(num_key_heads=2, num_value_heads=4, key_head_dim=32, value_head_dim=32),
                E=16, K=4, F=64, shared=64, vocab_size=512, max_position=2048, rope=RopeConfig(theta=1e6),
                dtype="float32"),
    _qwen3("tiny-moe-64x4", D=128, L=8, H=4, KV=2, E=64, K=4, F=64, vocab_size=512, head_dim=32,
           max_position=8192, dtype="float32"),
    ModelConfig(name="tiny-mixtral", architecture="mixtral", vocab_size=512, hidden_size=128,
                num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32, max_position=2048,
                rope=RopeConfig(theta=1e6), num_experts=8, num_experts_per_tok=2,
                moe_intermediate_size=128, dtype="float32"),
    ModelConfig(name="tiny-qwen2-moe", architecture="qwen2_moe", vocab_size=512, hidden_size=128,
                num_layers=4, num_heads=4, num_kv_heads=4, head_dim=32, max_position=2048,
                qkv_bias=True, num_experts=16, num_experts_per_tok=4, moe_intermediate_size=64,
                norm_topk_prob=False, shared_expert_intermediate_size=128, shared_expert_gate=True,
                dense_intermediate_size=256, moe_layers=(True, False, True, True), dtype="float32"),
    # GPT-OSS's structure at a tiny size; a 16-token window so that engine tests' requests outgrow it.
    _gpt_oss("tiny-gpt-oss", L=4, E=8, K=2, D=128, H=4, KV=2, F=64, window=16, vocab_size=512, head_dim=32,
             max_position=2048, eos_token_ids=(), dtype="float32"),
    ModelConfig(name="tiny-olmoe", architecture="olmoe", vocab_size=512, hidden_size=128, num_layers=4,
                num_heads=4, num_kv_heads=4, head_dim=32, max_position=2048, rms_norm_eps=1e-5,
                qk_norm="full", num_experts=16, num_experts_per_tok=4, moe_intermediate_size=64,
                norm_topk_prob=False, dtype="float32"),
    # Tiny DeepSeeks: V2-Lite's q projection with V2's group-limited routing; V3's q LoRA and biased
    # sigmoid routing. YaRN x8 with mscale 1.0 vs mscale_all_dim 0.8 (attention_factor != 1).
    _deepseek("tiny-deepseek-v2", "deepseek_v2", V=512, D=128, L=4, H=4, q_lora=None, kv_lora=32, nope=16, rope=8,
              v=16, E=16, K=4, F=32, shared=2, dense_F=256, first_dense=1, groups=(4, 2), scale=2.0, yarn=(1.0, 0.8),
              orig=256, max_position=2048, dtype="float32"),
    _deepseek("tiny-deepseek-v3", "deepseek_v3", V=512, D=128, L=4, H=4, q_lora=48, kv_lora=32, nope=16, rope=8,
              v=16, E=16, K=4, F=32, shared=1, dense_F=256, first_dense=1, groups=(4, 2), scale=2.5, yarn=(1.0, 0.8),
              orig=256, max_position=2048, dtype="float32"),
)

DEFAULT_MODEL = "tiny-qwen3-moe"


def check_dtype(dtype) -> None:
    """A dtype to run a model in: None (the checkpoint's) or one of DTYPES."""
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r} is not supported: use one of {', '.join(DTYPES)} (or None: the model's)")


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown model preset {name!r}; presets: {', '.join(sorted(PRESETS))}") from None
