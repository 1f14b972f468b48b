"""Log-probabilities computed on device with the sampled token (SamplingParams.logprobs) equal a plain
forward's log-softmax, for the fused whole-model program and the layer-by-layer path, greedy and
sampled (they are the model's distribution, before temperature / top-k / top-p)."""

import copy

import numpy as np
import pytest

from moejax import LLM, SamplingParams
from moejax.engine import build
from moejax.models.reference import prompt_logits

PROMPTS = [[5, 17, 3, 99, 250], [7, 8, 9]]


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.fixture(scope="module")
def llms():
    """One model, two engines: whole iterations as one program (fuse) or layer by layer."""
    fused = LLM("tiny-qwen3-moe", dtype="float32", max_model_len=64, num_blocks=16)
    layers = copy.copy(fused)
    layers.engine = build(fused.model, max_model_len=64, num_blocks=16, fuse=False)
    return {True: fused, False: layers}


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "layers"])
@pytest.mark.parametrize("params", [SamplingParams(max_tokens=5, ignore_eos=True, logprobs=3),
                                    SamplingParams(max_tokens=5, ignore_eos=True, logprobs=0, temperature=0.9, seed=3)],
                         ids=["greedy", "sampled"])
def test_logprobs_equal_a_plain_forward(llms, fuse, params):
    llm = llms[fuse]
    for prompt, out in zip(PROMPTS, llm.generate(PROMPTS, params)):
        want = log_softmax(prompt_logits(llm.model, prompt + out.token_ids[:-1])[len(prompt) - 1:])
        assert len(out.logprobs) == len(out.token_ids) == 5
        for i, (t, lp) in enumerate(zip(out.token_ids, out.logprobs)):
            assert lp.logprob == pytest.approx(want[i, t], abs=1e-4)
            top = np.argsort(-want[i])[:len(lp.top_ids)]
            assert list(lp.top_ids[:3]) == top[:3].tolist()
            assert lp.top_logprobs[:3] == pytest.approx(want[i, top[:3]].tolist(), abs=1e-4)
    assert llm.generate(PROMPTS[:1], SamplingParams(max_tokens=2))[0].logprobs is None  # only when asked
