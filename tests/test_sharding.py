"""Sharded execution on 8 CPU devices: the sharded model's logits equal the single-device model's for
every 8-device layout preset (on one architecture) and every architecture (on the layout that splits
the most: heads, MLP and experts), and the engine's greedy outputs are identical on every layout."""

from pathlib import Path

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from moejax.checkpoint import load_hf, load_model
from moejax.config import get_preset
from moejax.engine import build
from moejax.engine.sampling import SamplingParams
from moejax.meshes import LAYOUTS, Layout, LayoutError, get_layout
from moejax.models.model import build_model
from moejax.models.reference import prompt_logits

CPU8 = [name for name in LAYOUTS if name.startswith("cpu8-")]
ARCHS = ["tiny-qwen3-moe", "tiny-mixtral", "tiny-qwen2-moe", "tiny-olmoe"]
PROMPT = [(13 * i + 5) % 500 for i in range(37)]


@pytest.mark.parametrize("name", CPU8)
def test_cpu8_preset_fits_a_tiny_arch_and_8_devices(name):
    """The logits test skips layouts an architecture does not fit: each preset must fit one at least."""
    layout = get_layout(name)
    fits = []
    for arch in ARCHS:
        try:
            layout.validate(get_preset(arch), num_devices=8)
            fits.append(arch)
        except LayoutError:
            pass
    assert fits, f"{name} fits none of {ARCHS}"
    mesh = layout.make_mesh()
    assert dict(mesh.shape) == layout.axes and len(set(mesh.devices.flat)) == 8


# Every layout on one architecture, every architecture on the layout splitting heads, MLP and experts.
GRID = [("tiny-qwen3-moe", name) for name in CPU8] + [(arch, "cpu8-ep4-tp2") for arch in ARCHS[1:]]


@pytest.mark.parametrize("arch,layout", GRID, ids=[f"{a}-{n}" for a, n in GRID])
def test_sharded_logits_equal_single_device(arch, layout):
    get_layout(layout).validate(get_preset(arch))  # the grid only holds layouts that fit
    want = prompt_logits(build_model(get_preset(arch), seed=11), PROMPT)
    model, _ = load_model(arch, seed=11, layout=layout)
    np.testing.assert_allclose(prompt_logits(model, PROMPT), want, rtol=1e-5, atol=1e-5)


def test_sharded_hf_checkpoint_logits():
    path = Path(__file__).parent / "fixtures" / "hf" / "qwen3_moe"
    want = prompt_logits(load_hf(path), PROMPT[:20])
    model, _ = load_model(str(path), layout="cpu8-ep")
    assert model.expert_states[0]["w_gate_up"][...].sharding.spec[0] == "data"
    np.testing.assert_allclose(prompt_logits(model, PROMPT[:20]), want, rtol=1e-5, atol=1e-5)


def serve(model, prompts):
    engine = build(model, max_model_len=96, block_size=4, token_budget=24, num_blocks=8 * 24)
    reqs = [engine.add_request(p, SamplingParams(max_tokens=6, ignore_eos=True)) for p in prompts]
    while engine.has_unfinished:
        engine.step()
    return [r.output_token_ids for r in reqs]


# chunked prompts (30, 41 > the 24-token budget) mixed with decodes, spread over request shards
PROMPTS = [np.random.default_rng(0).integers(0, 512, n).tolist() for n in (5, 30, 12, 41, 2, 19, 8)]


@pytest.fixture(scope="module")
def single_device_outputs():
    return serve(build_model(get_preset("tiny-qwen3-moe"), seed=2), PROMPTS)


@pytest.mark.parametrize("layout", CPU8)
def test_engine_greedy_identical_sharded(layout, single_device_outputs):
    model, _ = load_model("tiny-qwen3-moe", seed=2, layout=layout)
    assert serve(model, PROMPTS) == single_device_outputs


def test_layout_validation_errors():
    cfg = get_preset("tiny-qwen3-moe")  # 4 heads, 2 KV heads, 16 experts
    with pytest.raises(LayoutError, match=r"splits kv_heads over tensor = 4 ways, but tiny-qwen3-moe has 2 KV heads"):
        Layout("t4", {"tensor": 4}, {"q_heads": "tensor", "kv_heads": "tensor"}).validate(cfg)
    with pytest.raises(LayoutError, match=r"splits expert over data = 32 ways, but tiny-qwen3-moe has 16 experts"):
        Layout("e32", {"data": 32}, {"expert": "data"}).validate(cfg)
    with pytest.raises(LayoutError, match=r"needs 6 devices \(data=3 x tensor=2\), 8 are available"):
        Layout("six", {"data": 3, "tensor": 2}).make_mesh()
    with pytest.raises(LayoutError, match=r"unknown logical axis 'heads'"):
        Layout("bad", {"tensor": 2}, {"heads": "tensor"})
    with pytest.raises(LayoutError, match=r"rule 'q_heads' -> 'model' names no mesh axis"):
        Layout("bad", {"tensor": 2}, {"q_heads": "model", "kv_heads": "model"})
    with pytest.raises(LayoutError, match=r"q_heads -> \('tensor',\) but kv_heads -> \(\)"):
        Layout("bad", {"tensor": 2}, {"q_heads": "tensor"})
    with pytest.raises(LayoutError, match=r"mesh axis 'data' has size 0"):
        Layout("bad", {"data": 0})
    with pytest.raises(LayoutError, match=r"unknown layout 'nope'"):
        get_layout("nope")


def test_layout_from_toml(tmp_path):
    f = tmp_path / "mine.toml"
    f.write_text('[axes]\ndata = 4\ntensor = 2\n[rules]\nbatch = "data"\nq_heads = "tensor"\n'
                 'kv_heads = "tensor"\nexpert = ["data", "tensor"]\n')
    layout = get_layout(str(f))
    assert layout.name == "mine" and layout.num_devices == 8
    assert layout.spec(("expert", "embed", "expert_mlp")) == P(("data", "tensor"), None, None)
    layout.validate(get_preset("tiny-qwen3-moe"), 8)
