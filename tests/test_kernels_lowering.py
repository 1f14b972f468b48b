"""Every tuned block-size entry compiles down to the target's kernel language at real model shapes.

Lowering runs the Mosaic GPU / Mosaic TPU Python lowering on this CPU machine, so it checks what
interpret mode cannot: wgmma/TMA shape and layout rules, the 227 KiB SMEM budget per CTA, TPU block
shape rules. (ptxas / the TPU compiler and the hardware itself still need a device.)
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import pytest

from moejax.kernels import ClampedSwiGLU, mosaic_gpu, tile_map, pallas

# (D, F, experts, rows): Mixtral-8x7B, Qwen3-30B-A3B, DeepSeek-V3 (expert count does not matter here).
MODELS = {"mixtral": (4096, 14336, 8, 4096), "qwen3": (2048, 768, 128, 2048), "deepseek_v3": (7168, 2048, 32, 2048)}


def lower(module, cfg, platform, D, F, E, R, biased=False):
    """biased: only the fused FFN of biased experts with GPT-OSS's clamped SwiGLU (its epilogue)."""
    def fn(x, w_gate_up, w_down, b_gate_up, group_sizes):
        tiles, slot, num_slots = tile_map.tile_rows(group_sizes, R, cfg.block_m)
        x_tiled = tile_map.gather_rows(x, tile_map.source_rows(slot, num_slots))
        if biased:
            return module.ffn(x_tiled, w_gate_up, w_down, tiles, cfg, ClampedSwiGLU(), jnp.bfloat16, b_gate_up)
        return (module.ffn(x_tiled, w_gate_up, w_down, tiles, cfg, "silu", jnp.bfloat16),  # moe_ffn's call
                module.ffn(x_tiled, w_gate_up, w_down, tiles, cfg, "gelu", jnp.float32),  # expert_ffn's
                module.gmm(x_tiled, w_down, tiles, cfg, jnp.float32))  # grouped_matmul's
    args = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in [(R, D), (E, D, 2 * F), (E, F, D), (E, 2 * F)]]
    text = jax.jit(fn).trace(*args, jax.ShapeDtypeStruct((E,), jnp.int32)).lower(
        lowering_platforms=(platform,)).as_text()
    return re.findall(r"custom_call @(\w+)", text)  # the kernels' calls


GPU_CONFIGS = list({cfg: None for table in mosaic_gpu.BLOCKS.values() for cfg in table.values()})


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("cfg", GPU_CONFIGS, ids=lambda c: f"bm{c.block_m}-bn{c.block_n}-{c.split}")
def test_mosaic_gpu_configs_lower_for_cuda(cfg, model):
    assert lower(mosaic_gpu, cfg, "cuda", *MODELS[model]) == ["mosaic_gpu_v2"] * 5  # ffn: 2 kernels each


@pytest.mark.parametrize("shape_class", ["decode", "mixed", "prefill"])
@pytest.mark.parametrize("model", list(MODELS))
def test_pallas_configs_lower_for_tpu(model, shape_class):
    cfg = dataclasses.replace(pallas.BLOCKS["tpu"][shape_class], interpret=False)
    assert lower(pallas, cfg, "tpu", *MODELS[model]) == ["tpu_custom_call"] * 3


@pytest.mark.parametrize("cfg", GPU_CONFIGS, ids=lambda c: f"bm{c.block_m}-bn{c.block_n}-{c.split}")
def test_mosaic_gpu_biased_clamped_ffn_lowers_for_cuda(cfg):
    """The gate/up bias epilogue (TMA to SMEM, broadcast over the rows) at Qwen3's expert shape (GPT-OSS's
    2880 is no multiple of 128: it falls back to the reference backend)."""
    assert lower(mosaic_gpu, cfg, "cuda", *MODELS["qwen3"], biased=True) == ["mosaic_gpu_v2"] * 2


@pytest.mark.parametrize("shape_class", ["decode", "prefill"])
def test_pallas_biased_clamped_ffn_lowers_for_tpu(shape_class):
    cfg = dataclasses.replace(pallas.BLOCKS["tpu"][shape_class], interpret=False)
    assert lower(pallas, cfg, "tpu", *MODELS["qwen3"], biased=True) == ["tpu_custom_call"]
