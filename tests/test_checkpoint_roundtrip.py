"""HF loading straight into a sharding, and orbax save/restore onto a different sharding."""

from pathlib import Path

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from moejax.checkpoint import load_hf, restore_model, save_model
from moejax.config import ModelConfig, get_preset
from moejax.meshes import Layout
from moejax.meshes.placement import make_placements
from moejax.models.model import build_model
from moejax.models.reference import prompt_logits

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
PROMPT = [5, 17, 3, 99, 250, 31, 7]


# Every parameter's "expert" axis over all 8 devices; the rest replicated.
EXPERTS_OVER_8 = Layout("x8", {"x": 8}, {"expert": "x"})


def test_hf_load_streams_into_sharding():
    plain = load_hf(FIXTURES / "qwen3_moe")
    sharded = load_hf(FIXTURES / "qwen3_moe", placements=make_placements(EXPERTS_OVER_8))
    w = sharded.expert_states[0]["w_gate_up"][...]
    assert w.sharding.spec == P("x", None, None) and len(w.addressable_shards) == 8
    assert w.addressable_shards[3].data.shape == (2, 64, 64)  # 16 experts / 8 devices
    np.testing.assert_array_equal(np.asarray(w), np.asarray(plain.expert_states[0]["w_gate_up"][...]))


def test_orbax_roundtrip_onto_another_sharding(tmp_path):
    model = build_model(get_preset("tiny-qwen3-moe"), seed=3)
    save_model(model, tmp_path / "ckpt")
    restored = restore_model(tmp_path / "ckpt", placements=make_placements(EXPERTS_OVER_8))
    assert restored.config == model.config
    for a, b in zip(jax.tree.leaves(model.params()), jax.tree.leaves(restored.params())):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    w = restored.expert_states[1]["w_down"][...]
    assert w.sharding.spec == P("x", None, None)
    np.testing.assert_allclose(prompt_logits(restored, PROMPT), prompt_logits(model, PROMPT), rtol=1e-5, atol=1e-5)


def test_config_dict_roundtrip():
    for name in ("qwen3-30b-a3b", "deepseek-v3", "gpt-oss-20b", "tiny-qwen2-moe"):
        cfg = get_preset(name)
        assert ModelConfig.from_dict(cfg.to_dict()) == cfg
