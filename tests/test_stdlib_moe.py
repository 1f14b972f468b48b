"""The shipped `stdlib-moe` checkpoint (trained by benchmarks/train_stdlib_moe.py): moejax loads it by
name and computes what the training forward and HF transformers compute, and the model learned."""

import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.assets import shipped_checkpoint, shipped_names
from moejax.checkpoint import CheckpointError, load_model
from moejax.models.reference import greedy_generate, prompt_logits

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT = REPO / "moejax" / "assets" / "stdlib-moe"
TRAINING = json.loads((REPO / "benchmarks" / "train_stdlib_moe.json").read_text())
REFERENCE = Path(__file__).parent / "fixtures" / "reference" / "stdlib_moe.npz"
WINDOW = 64  # tokens per held-out window of the loss check


def training_script():
    """benchmarks/train_stdlib_moe.py as a module (its forward needs only jax)."""
    spec = importlib.util.spec_from_file_location("train_stdlib_moe", REPO / "benchmarks" / "train_stdlib_moe.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def loaded():
    return load_model("stdlib-moe", dtype="float32")


@pytest.fixture(scope="module")
def reference():
    """transformers' outputs on two held-out windows free of router near-ties
    (tests/fixtures/make_stdlib_moe_reference.py): (npz, prompts)."""
    ref = np.load(REFERENCE)
    digest = hashlib.sha256((CHECKPOINT / "model.safetensors").read_bytes()).hexdigest()
    assert str(ref["safetensors_sha256"]) == digest, \
        "the reference was computed on other weights: rerun tests/fixtures/make_stdlib_moe_reference.py"
    bounds = np.cumsum(np.concatenate([[0], ref["prompt_lens"]]))
    return ref, [ref["prompt_ids"][a:b].tolist() for a, b in zip(bounds, bounds[1:])]


def test_loads_by_name_with_its_tokenizer(loaded):
    model, tokenizer = loaded
    assert "stdlib-moe" in shipped_names() and shipped_checkpoint("stdlib-moe") == CHECKPOINT
    assert shipped_checkpoint("no-such-model") is None
    cfg = model.config
    assert (cfg.architecture, cfg.num_layers, cfg.num_experts, cfg.num_experts_per_tok) == ("qwen3_moe", 8, 32, 4)
    assert cfg.tie_word_embeddings and cfg.qk_norm == "per_head" and cfg.norm_topk_prob
    assert tokenizer.get_vocab_size() == cfg.vocab_size
    assert cfg.eos_token_ids == (tokenizer.token_to_id("<|endoftext|>"),)


def test_unknown_name_lists_shipped_checkpoints():
    with pytest.raises(CheckpointError, match=r"shipped checkpoint \(.*stdlib-moe"):
        load_model("no-such-model")


def test_checkpoint_is_small_and_bf16():
    total = sum(p.stat().st_size for p in CHECKPOINT.iterdir())
    assert total <= 15e6, f"{CHECKPOINT} holds {total / 1e6:.2f} MB"
    assert json.loads((CHECKPOINT / "config.json").read_text())["dtype"] == "bfloat16"


def test_logits_equal_training_forward(loaded, reference):
    """moejax's engine forward (paged KV, layer by layer) == the training script's full-sequence
    forward, both in fp32 on the saved bf16 weights."""
    model, _ = loaded
    train = training_script()
    params, shape = train.load_checkpoint(CHECKPOINT)
    forward = jax.jit(train.forward, static_argnums=2)
    for ids in reference[1]:
        want = np.asarray(forward(params, jnp.asarray([ids]), shape)[0][0])
        got = prompt_logits(model, ids)
        scale = np.abs(want).max()
        assert np.abs(got - want).max() <= 1e-4 * scale, (len(ids), np.abs(got - want).max(), scale)


def test_matches_transformers(loaded, reference):
    """Logits and greedy tokens of transformers 5.23."""
    model, _ = loaded
    ref, prompts = reference
    for i, (prompt, greedy) in enumerate(zip(prompts, ref["greedy_ids"])):
        rows = ref["logit_prompt"] == i
        got, want = prompt_logits(model, prompt)[ref["logit_positions"][rows]], ref["logits"][rows]
        scale = np.abs(want).max()
        assert np.abs(got - want).max() <= 1e-4 * scale, (len(prompt), np.abs(got - want).max(), scale)
        assert greedy_generate(model, prompt, 16) == greedy.tolist()


def test_learned_beats_unigram_on_heldout(loaded):
    """Next-token loss on held-out snippets is below the train split's unigram baseline."""
    model, tokenizer = loaded
    nll = []
    for text in TRAINING["heldout_snippets"]:
        ids = tokenizer.encode(text).ids
        for start in range(0, len(ids) - WINDOW + 1, WINDOW):  # equal windows: one compiled shape
            window = ids[start:start + WINDOW]
            logits = prompt_logits(model, window)[:-1]
            logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
            nll += (-logp[np.arange(WINDOW - 1), window[1:]]).tolist()
    assert len(nll) >= 10 * (WINDOW - 1), len(nll)
    final = TRAINING["final"]
    assert np.mean(nll) < final["unigram_heldout_loss"] < final["log_vocab"], (np.mean(nll), final)
