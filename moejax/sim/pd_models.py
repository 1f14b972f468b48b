"""The models of PrfaaS's KV-throughput table (arXiv 2604.15039) as the simulator can price them.

Hybrid models mix full-attention layers (KV grows with the prompt) with sliding-window or linear
(recurrent) layers (a bounded or fixed state). A `PdModel` is its layers in parts, each a ModelConfig the
cost model prices as it stands:

    attention parts   full-attention (GQA or MLA) and sliding-window layers, exact shapes: KV bytes from
                      moejax.engine.kv_cache.kv_bytes
    linear parts      KDA / Gated DeltaNet / Lightning layers, priced as GQA layers of the same head count
                      and width attending a 128-token window (a chunked linear-attention kernel's FLOPs per
                      token, ~4·H·d·(chunk/2 + d), are those of a window of ~d keys); their KV is the
                      recurrent state (heads × d_k × d_v) plus the short-convolution state, fixed in length

The first part carries the vocabulary (embedding, LM head); the others have vocab_size 1 so the head
is priced once. Shapes from the public HF configs as we read them (not re-checked against the files; no
weights or configs are downloaded): uncertainties are in each model's `notes`. Recurrent states are
counted in the model dtype (bf16), as vLLM caches them by default.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moejax.config import PRESETS, MLAShape, ModelConfig, RopeConfig
from moejax.engine import traffic

LINEAR_PROXY_WINDOW = 128  # keys a linear-attention layer is priced as attending (see the module docstring)


@dataclass(frozen=True)
class LayerPart:
    config: ModelConfig  # these layers, as moejax prices them
    state_bytes: int | None = None  # linear layers: per-request recurrent + conv state, all of them (None: attention)


@dataclass(frozen=True)
class PdModel:
    name: str
    layout: str  # e.g. "KDA:MLA 3:1"
    parts: tuple[LayerPart, ...]
    paper_phi_kv_gbps: float | None = None  # PrfaaS's Φ_kv at 32K tokens on 8×H200, as reported
    notes: str = ""

    @property
    def num_layers(self) -> int:
        return sum(p.config.num_layers for p in self.parts)

    @property
    def full_attention_layers(self) -> int:
        return sum(w is None for p in self.parts if p.state_bytes is None for w in p.config.sliding_windows)

    @property
    def dtype_bytes(self) -> int:
        return self.parts[0].config.dtype_bytes

    def weight_bytes(self) -> int:
        return sum(traffic.model_bytes(p.config) for p in self.parts)

    def kv_bytes(self, num_tokens) -> np.ndarray:
        """Bytes one request's prefill leaves behind (what PD ships) at num_tokens (int or [n] array):
        attention layers' KV (as moejax.engine.kv_cache.kv_bytes counts it) plus the linear layers'
        fixed state."""
        n = np.asarray(num_tokens, np.int64)
        out = np.zeros(n.shape, np.int64)
        for part in self.parts:
            if part.state_bytes is not None:
                out += part.state_bytes
                continue
            cfg = part.config  # what kv_cache.kv_bytes counts: every token of a full layer, a window's last
            for shape in traffic.layer_shapes(cfg):
                kept = n if shape.window is None else np.minimum(n, shape.window)
                out += shape.kv_elems_per_token * cfg.dtype_bytes * kept
        return out if out.ndim else int(out)


def recurrent_state_bytes(layers: int, heads: int, k_dim: int, v_dim: int, conv_channels: int = 0,
                          conv_kernel: int = 0, dtype_bytes: int = 2) -> int:
    """A linear-attention layer's per-request state: heads × d_k × d_v, plus (kernel − 1) past inputs of
    its short convolution; times `layers`."""
    return layers * (heads * k_dim * v_dim + conv_channels * max(conv_kernel - 1, 0)) * dtype_bytes


def _moe(name, *, V, D, L, H, KV, hd, E, K, F, shared=0, window=None, dense=0, dense_F=0,
         mla: MLAShape | None = None, gate=False) -> ModelConfig:
    """L layers of one kind: the first `dense` with a dense MLP, the rest MoE."""
    return ModelConfig(name=name, architecture="sim", vocab_size=V, hidden_size=D, num_layers=L, num_heads=H,
                       num_kv_heads=H if mla else KV, head_dim=mla.qk_head_dim if mla else hd,
                       max_position=262144, rope=RopeConfig(theta=1e6), mla=mla,
                       sliding_windows=(window,) * L, num_experts=E, num_experts_per_tok=K,
                       moe_intermediate_size=F, shared_expert_intermediate_size=shared, shared_expert_gate=gate,
                       dense_intermediate_size=dense_F, moe_layers=(False,) * dense + (True,) * (L - dense))


def _linear(name, *, D, L, H, KV, hd, E, K, F, shared=0, dense=0, dense_F=0, gate=False) -> ModelConfig:
    return _moe(name, V=1, D=D, L=L, H=H, KV=KV, hd=hd, E=E, K=K, F=F, shared=shared, window=LINEAR_PROXY_WINDOW,
                dense=dense, dense_F=dense_F, gate=gate)


def _mla(kv_lora=512, rope=64, nope=128, v=128, q_lora=None) -> MLAShape:
    return MLAShape(q_lora_rank=q_lora, kv_lora_rank=kv_lora, qk_nope_head_dim=nope, qk_rope_head_dim=rope, v_head_dim=v)


PD_MODELS: dict[str, PdModel] = {m.name: m for m in (
    PdModel(
        "kimi-linear-48b-a3b", "KDA:MLA 3:1",
        (LayerPart(_moe("kimi-linear/mla", V=163840, D=2304, L=7, H=32, KV=32, hd=0, E=256, K=8, F=1024,
                        shared=1024, mla=_mla())),
         LayerPart(_linear("kimi-linear/kda", D=2304, L=20, H=32, KV=32, hd=128, E=256, K=8, F=1024, shared=1024,
                           dense=1, dense_F=9216),
                   recurrent_state_bytes(20, heads=32, k_dim=128, v_dim=128, conv_channels=3 * 32 * 128, conv_kernel=4))),
        paper_phi_kv_gbps=3.87,
        notes="moonshotai/Kimi-Linear-48B-A3B: 27 layers (7 MLA, 20 KDA), layer 1 dense; MLA without q LoRA"),
    PdModel(
        "mimo-v2-flash", "SWA:GQA 5:1",
        (LayerPart(_moe("mimo-v2-flash/full", V=152576, D=4096, L=8, H=64, KV=4, hd=160, E=256, K=8, F=2048,
                        dense=1, dense_F=16384)),
         LayerPart(_moe("mimo-v2-flash/swa", V=1, D=4096, L=40, H=64, KV=8, hd=160, E=256, K=8, F=2048, window=128))),
        paper_phi_kv_gbps=4.66,
        notes="XiaomiMiMo/MiMo-V2-Flash: 48 layers (8 full with 4 KV heads, 40 sliding-window of 128 with 8), "
              "q/k heads 192 and v 128 wide: modelled as 160 (the same K+V bytes and score+value FLOPs); "
              "first layer dense; attention sinks not priced"),
    PdModel(
        "qwen3.5-397b-a17b", "GDN:GQA 3:1",
        (LayerPart(_moe("qwen3.5-397b/attn", V=248320, D=4096, L=15, H=32, KV=2, hd=256, E=512, K=10, F=1024,
                        shared=1024, gate=True)),
         LayerPart(_linear("qwen3.5-397b/gdn", D=4096, L=45, H=64, KV=16, hd=128, E=512, K=10, F=1024, shared=1024,
                           gate=True),
                   recurrent_state_bytes(45, heads=64, k_dim=128, v_dim=128, conv_channels=2 * 16 * 128 + 64 * 128,
                                         conv_kernel=4))),
        paper_phi_kv_gbps=8.25,
        notes="Qwen/Qwen3.5-397B-A17B: 60 layers (15 gated GQA with 2 KV heads of 256, 45 Gated DeltaNet with 16 key / "
              "64 value heads of 128); the attention output gate's extra q projection not priced"),
    PdModel(
        "ring-2.5-1t", "Lightning:MLA 7:1",
        (LayerPart(_moe("ring-2.5-1t/mla", V=157184, D=8192, L=10, H=64, KV=64, hd=0, E=256, K=8, F=2048,
                        shared=2048, mla=_mla(q_lora=1536))),
         LayerPart(_linear("ring-2.5-1t/lightning", D=8192, L=70, H=64, KV=8, hd=128, E=256, K=8, F=2048,
                           shared=2048, dense=4, dense_F=18432),
                   recurrent_state_bytes(70, heads=64, k_dim=128, v_dim=128))),
        paper_phi_kv_gbps=2.59,
        notes="inclusionAI/Ring-2.5-1T: the least certain shape: Ling-1T's (80 layers, hidden 8192, 256 experts "
              "top-8 + 1 shared, 4 dense layers) with every 8th layer MLA and the others Lightning attention "
              "(64 heads of 128, no convolution)"),
    PdModel(
        "minimax-m2.5", "GQA (all layers)",
        (LayerPart(_moe("minimax-m2.5", V=200064, D=3072, L=62, H=48, KV=8, hd=128, E=256, K=8, F=1536)),),
        paper_phi_kv_gbps=59.93,
        notes="MiniMaxAI/MiniMax-M2.5 (M2's architecture): 62 full-attention layers, 8 KV heads of 128"),
    PdModel(
        "qwen3-235b-a22b", "GQA (all layers)", (LayerPart(PRESETS["qwen3-235b-a22b"]),),
        paper_phi_kv_gbps=33.35, notes="moejax's qwen3-235b-a22b preset: 94 layers, 4 KV heads of 128"),
)}


def get_pd_model(name: str) -> PdModel:
    try:
        return PD_MODELS[name]
    except KeyError:
        raise ValueError(f"unknown PrfaaS model {name!r}; models: {', '.join(PD_MODELS)}") from None
