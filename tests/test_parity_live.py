"""Parity against HF transformers run live in this process (on machines that have torch and
transformers, e.g. the GPU image); CI's venv has neither, so it skips there with that reason."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch", reason="live parity needs torch (CI checks the committed fixtures instead)")
pytest.importorskip("transformers", reason="live parity needs transformers (CI checks the committed fixtures instead)")

from moejax.checkpoint import load_hf  # noqa: E402
from moejax.models.reference import prompt_logits  # noqa: E402


def _fixtures_module():
    spec = importlib.util.spec_from_file_location("make_fixtures", Path(__file__).parent / "fixtures" / "make_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_fixtures"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
def test_live_logits_match_transformers(name, tmp_path):
    mf = _fixtures_module()
    hf_model, _ = mf.build_model(name)
    hf_model.save_pretrained(tmp_path)
    model = load_hf(tmp_path, dtype="float32")
    prompts = mf.random_prompts(hf_model.config.vocab_size, lens=(3, 11, 24), seed=12345)
    want_all = mf.prompt_logits(hf_model, prompts)
    ends = np.cumsum([len(p) for p in prompts])
    for prompt, want in zip(prompts, np.split(want_all, ends[:-1])):
        got = prompt_logits(model, prompt)
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
