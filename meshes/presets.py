"""Layout presets per machine. `get_layout(name)` also accepts a path to a TOML layout file."""

from __future__ import annotations

from pathlib import Path

from .layout import Layout, LayoutError, SplitLayout

# DP-attention + EP (DeepSeek-style): the same devices shard requests for attention and experts for MoE.
_DP_EP = {"batch": "data", "expert": "data"}

LAYOUTS: dict[str, Layout] = {l.name: l for l in [
    Layout("single"),  # one device: everything replicated
    # 8 CPU devices (what the tests use, with jax_num_cpu_devices=8)
    Layout("cpu8-dp", {"data": 8}, {"batch": "data"}),
    Layout("cpu8-ep", {"data": 8}, _DP_EP),
    Layout("cpu8-dp4-tp2", {"data": 4, "tensor": 2},
           {"batch": "data", "q_heads": "tensor", "kv_heads": "tensor", "mlp": "tensor"}),
    Layout("cpu8-ep4-tp2", {"data": 4, "tensor": 2},
           {"batch": "data", "q_heads": "tensor", "kv_heads": "tensor", "mlp": "tensor", "expert": "data"}),
    Layout("cpu8-tp2-ep8", {"data": 4, "tensor": 2},
           {"batch": "data", "q_heads": "tensor", "kv_heads": "tensor", "expert": ("data", "tensor")}),
    # GPUs
    Layout("h100x1"),
    Layout("gpu8-node", {"data": 2, "tensor": 4},  # TP-4 attention x 2 DP replicas, EP over all 8
           {"batch": "data", "q_heads": "tensor", "kv_heads": "tensor", "mlp": "tensor", "expert": ("data", "tensor")}),
    Layout("gpu8-ep", {"data": 8}, _DP_EP),
    Layout("multinode-2x8", {"node": 2, "data": 2, "tensor": 4},
           {"batch": ("node", "data"), "q_heads": "tensor", "kv_heads": "tensor", "mlp": "tensor",
            "expert": ("node", "data", "tensor")}),
]}

SPLIT_LAYOUTS: dict[str, SplitLayout] = {s.name: s for s in [
    SplitLayout("cpu8-attn4-exp4", "attention_expert", {
        "attention": Layout("attn", {"data": 4}, {"batch": "data"}),
        "experts": Layout("exp", {"expert": 4}, {"expert": "expert"})}),
    SplitLayout("cpu8-attn2-exp6", "attention_expert", {  # 6 expert devices: experts split 2 ways, 3 replicas
        "attention": Layout("attn", {"data": 2}, {"batch": "data"}),
        "experts": Layout("exp", {"replica": 3, "expert": 2}, {"expert": "expert"})}),
    SplitLayout("cpu8-attn6-exp2", "attention_expert", {
        "attention": Layout("attn", {"data": 6}, {"batch": "data"}),
        "experts": Layout("exp", {"expert": 2}, {"expert": "expert"})}),
    SplitLayout("cpu8-prefill4-decode4", "prefill_decode", {
        "prefill": Layout("prefill", {"data": 4}, {"batch": "data"}),
        "decode": Layout("decode", {"data": 4}, _DP_EP)}),
    SplitLayout("gpu16-attn8-exp8", "attention_expert", {
        "attention": Layout("attn", {"data": 2, "tensor": 4},
                            {"batch": "data", "q_heads": "tensor", "kv_heads": "tensor"}),
        "experts": Layout("exp", {"expert": 8}, {"expert": "expert"})}),
]}


def get_layout(name: str) -> Layout:
    if name in LAYOUTS:
        return LAYOUTS[name]
    if name.endswith(".toml") and Path(name).is_file():
        return Layout.from_toml(name)
    raise LayoutError(f"unknown layout {name!r}; presets: {', '.join(LAYOUTS)} (or a path to a .toml layout)")


def get_split_layout(name: str) -> SplitLayout:
    try:
        return SPLIT_LAYOUTS[name]
    except KeyError:
        raise LayoutError(f"unknown split layout {name!r}; presets: {', '.join(SPLIT_LAYOUTS)}") from None
