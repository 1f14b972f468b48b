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
EXECUTABLE_ARCHITECTURES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "qwen3_next")


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

    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int

    def attn_params(self, hidden: int, heads: int) -> int:
        qk = self.qk_nope_head_dim + self.qk_rope_head_dim
        return (hidden * self.q_lora_rank + self.q_lora_rank * heads * qk  # q down / up
                + hidden * (self.kv_lora_rank + self.qk_rope_head_dim)  # kv down (+ rope key)
                + self.kv_lora_rank * heads * (self.qk_nope_head_dim + self.v_head_dim)  # kv up
                + heads * self.v_head_dim * hidden  # o
                + self.q_lora_rank + self.kv_lora_rank + 2 * hidden)  # norms

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
    # Attention window per layer (None = full attention); hybrid models mix both.
    sliding_windows: tuple[int | None, ...] = ()
    # MoE
    num_experts: int = 0  # E; 0 = a dense model
    num_experts_per_tok: int = 0  # top-k
    moe_intermediate_size: int = 0  # F
    norm_topk_prob: bool = True  # renormalise the top-k softmax probabilities to sum to 1
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE shared expert; 0 = none
    shared_expert_gate: bool = False  # sigmoid(x @ w) scales the shared expert (Qwen2-MoE)
    dense_intermediate_size: int = 0  # MLP width of the non-MoE layers
    moe_layers: tuple[bool, ...] = ()  # per layer: MoE block (True) or dense MLP (False)
    # Multi-head latent attention (DeepSeek) instead of GQA: costed by the simulator, not executable yet.
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
        return self.architecture in EXECUTABLE_ARCHITECTURES and self.mla is None

    @property
    def dtype_bytes(self) -> int:
        return 4 if self.dtype == "float32" else 2

    def expert_params(self) -> int:
        """Parameters of one routed expert (SwiGLU: gate, up, down)."""
        return 3 * self.hidden_size * self.moe_intermediate_size

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
    need(cfg.dtype in ("float32", "bfloat16", "float16"), "dtype", f"unsupported dtype {cfg.dtype!r}")
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
    return RopeConfig(
        theta=theta,
        kind=kind,
        factor=float(params.get("factor", 1.0)),
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
    num_experts = int(_require(hf, "num_local_experts", "num_experts"))
    head_dim = int(_first(hf, "head_dim", default=hidden // num_heads))
    dtype = str(_first(hf, "dtype", "torch_dtype", default="bfloat16")).replace("torch.", "")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"config.json: dtype {dtype!r} is not supported (float32, bfloat16, float16)")

    window = _first(hf, "sliding_window")
    if arch == "qwen2_moe":
        # Qwen2-MoE applies its window only to the layers `layer_types` marks as sliding.
        types = hf.get("layer_types") or ["full_attention"] * num_layers
        if not hf.get("use_sliding_window", False):
            types = ["full_attention"] * num_layers
        windows = tuple(int(window) if t == "sliding_attention" and window else None for t in types)
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
    else:
        moe_layers = (True,) * num_layers

    eos = hf.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
    quirks: dict[str, Any] = _qwen3_next_quirks(hf, num_layers) if arch == "qwen3_next" else {
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
    }[arch]
    return ModelConfig(
        name=name,
        architecture=arch,
        vocab_size=int(_require(hf, "vocab_size")),
        hidden_size=hidden,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=int(_first(hf, "num_key_value_heads", default=num_heads)),
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
    # Simulator-only shapes: attention kinds moejax does not execute yet.
    ModelConfig(name="gpt-oss-20b", architecture="gpt_oss", vocab_size=201088, hidden_size=2880,
                num_layers=24, num_heads=64, num_kv_heads=8, head_dim=64, max_position=131072,
                sliding_windows=tuple(128 if i % 2 == 0 else None for i in range(24)),
                qkv_bias=True, o_bias=True, num_experts=32, num_experts_per_tok=4,
                moe_intermediate_size=2880),
    ModelConfig(name="gpt-oss-120b", architecture="gpt_oss", vocab_size=201088, hidden_size=2880,
                num_layers=36, num_heads=64, num_kv_heads=8, head_dim=64, max_position=131072,
                sliding_windows=tuple(128 if i % 2 == 0 else None for i in range(36)),
                qkv_bias=True, o_bias=True, num_experts=128, num_experts_per_tok=4,
                moe_intermediate_size=2880),
    ModelConfig(name="deepseek-v3", architecture="deepseek_v3", vocab_size=129280, hidden_size=7168,
                num_layers=61, num_heads=128, num_kv_heads=128, head_dim=192, max_position=163840,
                mla=MLAShape(q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                             v_head_dim=128), num_experts=256, num_experts_per_tok=8,
                moe_intermediate_size=2048, shared_expert_intermediate_size=2048,
                dense_intermediate_size=18432, moe_layers=(False,) * 3 + (True,) * 58),
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
    ModelConfig(name="tiny-olmoe", architecture="olmoe", vocab_size=512, hidden_size=128, num_layers=4,
                num_heads=4, num_kv_heads=4, head_dim=32, max_position=2048, rms_norm_eps=1e-5,
                qk_norm="full", num_experts=16, num_experts_per_tok=4, moe_intermediate_size=64,
                norm_topk_prob=False, dtype="float32"),
)

DEFAULT_MODEL = "tiny-qwen3-moe"


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown model preset {name!r}; presets: {', '.join(sorted(PRESETS))}") from None
