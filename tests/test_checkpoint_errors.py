"""Bad checkpoints fail loudly and precisely: each error names the tensor or field and what was expected."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from moejax.checkpoint import CheckpointError, load_hf
from moejax.checkpoint.safetensors_file import SafetensorsFile
from moejax.config import ConfigError

FIXTURES = Path(__file__).parent / "fixtures" / "hf"


def fixture_copy(name: str, tmp_path: Path) -> Path:
    """A writable copy of a shipped HF fixture checkpoint, for a test to damage."""
    return Path(shutil.copytree(FIXTURES / name, tmp_path / name))


@pytest.fixture
def mixtral(tmp_path):
    return fixture_copy("mixtral", tmp_path)


def tensors(d: Path) -> dict[str, np.ndarray]:
    f = SafetensorsFile(d / "model.safetensors")
    return {k: np.array(f.tensor(k)) for k in f.keys()}


def rewrite(d: Path, change) -> None:
    t = tensors(d)
    change(t)
    save_file(t, str(d / "model.safetensors"))


def edit_config(d: Path, **changes) -> None:
    cfg = json.loads((d / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg))


def test_missing_tensor(mixtral):
    rewrite(mixtral, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor: model\.layers\.1\.self_attn\.k_proj\.weight "
                                              r"\(for layers\.1\.attn\.w_k, shape \[32, 64\]\)"):
        load_hf(mixtral)


def test_missing_expert(mixtral):
    rewrite(mixtral, lambda t: t.pop("model.layers.0.block_sparse_moe.experts.5.w3.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor: model\.layers\.0\.block_sparse_moe\.experts\.5\.w3"):
        load_hf(mixtral)


def test_unexpected_tensor(mixtral):
    rewrite(mixtral, lambda t: t.update({"model.layers.0.mystery.weight": np.zeros(3, np.float32)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor for a mixtral model.*model\.layers\.0\.mystery\.weight"):
        load_hf(mixtral)


def test_more_experts_than_config(mixtral):
    edit_config(mixtral, num_local_experts=4)
    with pytest.raises(CheckpointError, match=r"unexpected tensors .*experts\.4\."):
        load_hf(mixtral)


def test_wrong_shape(mixtral):
    rewrite(mixtral, lambda t: t.update({"model.layers.0.self_attn.q_proj.weight": np.zeros((64, 32), np.float32)}))
    with pytest.raises(CheckpointError, match=r"q_proj\.weight has shape \[64, 32\], expected \[64, 64\] "
                                              r"\(for layers\.0\.attn\.w_q"):
        load_hf(mixtral)


def test_config_disagrees_with_tensors(mixtral):
    edit_config(mixtral, hidden_size=128)
    with pytest.raises(CheckpointError, match=r"model\.embed_tokens\.weight has shape \[256, 64\], expected \[256, 128\]"):
        load_hf(mixtral)


def test_unsupported_architecture(mixtral):
    edit_config(mixtral, model_type="llama", architectures=["LlamaForCausalLM"])
    with pytest.raises(ConfigError, match=r"model_type 'llama' \(architectures=\['LlamaForCausalLM'\]\) is not supported"):
        load_hf(mixtral)


def test_missing_config_field(mixtral):
    edit_config(mixtral, num_experts_per_tok=None)
    with pytest.raises(ConfigError, match=r"missing field num_experts_per_tok"):
        load_hf(mixtral)


def test_unsupported_rope(mixtral):
    edit_config(mixtral, rope_parameters={"rope_type": "longrope", "rope_theta": 1e4})
    with pytest.raises(ConfigError, match=r"unsupported RoPE type 'longrope'"):
        load_hf(mixtral)


def test_invalid_config_json(mixtral):
    (mixtral / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"config\.json: not valid JSON"):
        load_hf(mixtral)


def test_truncated_file(mixtral):
    path = mixtral / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"corrupt tensor '.*': data_offsets .* do not fit .*truncated"):
        load_hf(mixtral)


def test_garbage_header(mixtral):
    (mixtral / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00this is not json!")
    with pytest.raises(CheckpointError, match=r"corrupt safetensors header"):
        load_hf(mixtral)


def test_header_longer_than_file(mixtral):
    (mixtral / "model.safetensors").write_bytes(b"\xff" * 8 + b"{}")
    with pytest.raises(CheckpointError, match=r"header length .* exceeds the file size 10"):
        load_hf(mixtral)


def test_no_weights(mixtral):
    (mixtral / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no model\.safetensors or model\.safetensors\.index\.json "
                                              r"\(found: config\.json, generation_config\.json\)"):
        load_hf(mixtral)


def test_index_points_to_missing_shard(tmp_path):
    d = tmp_path / "qwen2_moe"
    shutil.copytree(FIXTURES / "qwen2_moe", d)
    (d / "model-00003-of-00012.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"tensor '.*' is in model-00003-of-00012\.safetensors, which does not exist"):
        load_hf(d)


def test_unsupported_dtype_in_file(mixtral):
    rewrite(mixtral, lambda t: t.update({"model.norm.weight": t["model.norm.weight"].astype(np.complex64)}))
    with pytest.raises(CheckpointError, match=r"tensor 'model\.norm\.weight' has unsupported dtype C64"):
        load_hf(mixtral)


@pytest.fixture
def gpt_oss(tmp_path):
    return fixture_copy("gpt_oss", tmp_path)


def test_gpt_oss_missing_sinks_and_expert_bias(gpt_oss):
    rewrite(gpt_oss, lambda t: t.pop("model.layers.2.self_attn.sinks"))
    with pytest.raises(CheckpointError, match=r"missing tensor: model\.layers\.2\.self_attn\.sinks "
                                              r"\(for layers\.2\.attn\.sinks, shape \[4\]\)"):
        load_hf(gpt_oss)
    shutil.copy(FIXTURES / "gpt_oss" / "model.safetensors", gpt_oss / "model.safetensors")
    rewrite(gpt_oss, lambda t: t.pop("model.layers.0.mlp.experts.gate_up_proj_bias"))
    with pytest.raises(CheckpointError, match=r"missing tensor: model\.layers\.0\.mlp\.experts\.gate_up_proj_bias "
                                              r"\(for experts\.0\.b_gate_up, shape \[8, 64\]\)"):
        load_hf(gpt_oss)


def test_gpt_oss_mxfp4_checkpoint_is_named(gpt_oss):
    """Real GPT-OSS checkpoints ship MXFP4 experts (gate_up_proj_blocks / _scales): refused by name."""
    edit_config(gpt_oss, quantization_config={"quant_method": "mxfp4"})
    with pytest.raises(ConfigError, match=r"quantization_config\.quant_method 'mxfp4'.*dequantise"):
        load_hf(gpt_oss)


def test_gpt_oss_layer_types(gpt_oss):
    edit_config(gpt_oss, layer_types=["sliding_attention", "chunked_attention", "full_attention"])
    with pytest.raises(ConfigError, match=r"layer_types: unsupported layer types \['chunked_attention'\]"):
        load_hf(gpt_oss)
    edit_config(gpt_oss, layer_types=["sliding_attention", "full_attention"])
    with pytest.raises(ConfigError, match=r"layer_types has 2 entries for 3 layers"):
        load_hf(gpt_oss)


@pytest.fixture
def qwen3_next(tmp_path):
    return fixture_copy("qwen3_next", tmp_path)


def test_qwen3_next_layer_types(qwen3_next):
    edit_config(qwen3_next, layer_types=["linear_attention", "sliding_attention", "linear_attention", "full_attention"])
    with pytest.raises(ConfigError, match=r"layer_types must name linear_attention or full_attention for each of the "
                                          r"4 layers; got 4 entries, unknown \['sliding_attention'\]"):
        load_hf(qwen3_next)
    edit_config(qwen3_next, layer_types=["linear_attention"] * 3)
    with pytest.raises(ConfigError, match=r"for each of the 4 layers; got 3 entries"):
        load_hf(qwen3_next)


def test_qwen3_next_linear_attention_fields(qwen3_next):
    edit_config(qwen3_next, linear_num_value_heads=None)
    with pytest.raises(ConfigError, match=r"missing field linear_num_value_heads"):
        load_hf(qwen3_next)
    edit_config(qwen3_next, linear_num_value_heads=3)
    with pytest.raises(ConfigError, match=r"linear_attention\.num_value_heads: num_value_heads=3 is not a multiple "
                                          r"of num_key_heads=2"):
        load_hf(qwen3_next)


def test_qwen3_next_conv_shape_and_ignored_mtp(qwen3_next):
    """A conv weight of the wrong shape is named; a multi-token-prediction module (real Qwen3-Next
    checkpoints ship one) is not an unexpected tensor."""
    rewrite(qwen3_next, lambda t: t.update({"mtp.fc.weight": np.zeros((4, 4), np.float32)}))
    model = load_hf(qwen3_next)
    assert model.config.linear_layers == (True, True, True, False) and model.config.rotary_dim == 4
    rewrite(qwen3_next, lambda t: t.update({"model.layers.2.linear_attn.conv1d.weight": np.zeros((128, 1, 3), np.float32)}))
    with pytest.raises(CheckpointError, match=r"linear_attn\.conv1d\.weight has shape \[128, 1, 3\], expected "
                                              r"\[128, 1, 4\] \(for layers\.2\.attn\.conv_taps"):
        load_hf(qwen3_next)
