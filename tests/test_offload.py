"""The offload executor: greedy outputs equal the jax executor's on every architecture, with every
predictor and cache sizes from top-k slots to all experts, under chunked and layered prefill; bytes
moved host -> device counted by hand; experts in host memory kinds; the host path; bad settings."""

import jax
import numpy as np
import pytest

from moejax.assets import shipped_checkpoint
from moejax.checkpoint import load_model
from moejax.config import get_preset
from moejax.engine import build
from moejax.engine.sampling import SamplingParams
from moejax.models.model import build_model
from moejax.models.reference import prompt_routing
from moejax.offload.learned import PREDICTOR_DIR, PredictorError

GREEDY = SamplingParams(max_tokens=5, ignore_eos=True)
# (predictor, cache slots: top-k / half / all experts, policy), spread over the architectures; the
# first in the fast suite (its compiled programs shared by the tests here), the others slow
CASES = [
    ("tiny-qwen3-moe", "none", "k", "chunked@16"), ("tiny-qwen3-moe", "lfru", "half", "layered"),
    ("tiny-mixtral", "gate-ahead", "k", "layered"), ("tiny-qwen2-moe", "none", "half", "layered"),  # a dense layer
    ("tiny-olmoe", "gate-ahead", "all", "chunked@16"),
]
FAST_ARCH = "tiny-qwen3-moe"


class Models(dict):
    def __missing__(self, arch):
        self[arch] = build_model(get_preset(arch), seed=3)
        return self[arch]


@pytest.fixture(scope="module")
def models():
    return Models()


@pytest.fixture(scope="module")
def reference(models):
    """(arch, policy) -> the jax executor's greedy outputs on prompts_for(...), each computed once."""
    cache = {}

    def get(arch, policy):
        if (arch, policy) not in cache:
            cache[arch, policy] = serve(models[arch], "jax", prompts_for(models[arch].config.vocab_size),
                                        policy=policy)[0]
        return cache[arch, policy]
    return get


def prompts_for(vocab: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, n).tolist() for n in (5, 36, 1)]


def serve(model, executor, prompts, **options):
    engine = build(model, executor, max_model_len=128, block_size=4, **options)
    requests = [engine.add_request(p, GREEDY) for p in prompts]
    while engine.has_unfinished:
        engine.step()
    return [r.output_token_ids for r in requests], engine


def slots_of(cfg, size: str) -> int:
    return {"k": cfg.num_experts_per_tok, "half": cfg.num_experts // 2, "all": cfg.num_experts}[size]


@pytest.mark.parametrize("arch, predictor, size, policy",
                         [c if i == 0 else pytest.param(*c, marks=pytest.mark.slow) for i, c in enumerate(CASES)])
def test_greedy_equals_the_jax_executor(arch, predictor, size, policy, models, reference):
    """Against the jax executor as it serves (multi-step decode): offload runs one step per plan."""
    model = models[arch]
    got, engine = serve(model, "offload", prompts_for(model.config.vocab_size), policy=policy, predictor=predictor,
                        device_expert_slots=slots_of(model.config, size))
    assert got == reference(arch, policy)
    assert engine.executor.max_decode_steps == 1
    s = engine.executor.offload_summary()
    assert s["slots"] == slots_of(model.config, size) and s["bytes_h2d"] == engine.executor.cache.bytes_h2d > 0
    if size == "k":  # a batch needs more experts than top-k slots: the surplus ran from the transient buffer
        assert s["loads_transient"] > 0


@pytest.fixture(scope="module")
def stdlib():
    model, tokenizer = load_model("stdlib-moe")
    prompts = [tokenizer.encode(t).ids for t in (
        "import os\nimport sys\n\ndef main(argv):\n    ", "class Queue:\n    def __init__(self, maxsize=0):\n",
        "    for key, value in sorted(items.items()):\n        if value is None:", "return")]
    return model, prompts


@pytest.mark.slow
def test_stdlib_moe_learned_and_layered_prefill_on_offload(stdlib):
    """The trained model with its shipped predictor; layered prefill reads each expert once per prompt
    where chunked prefill reads it once per chunk: fewer bytes cross from the host."""
    model, prompts = stdlib
    long_prompt = [prompts[0] * 6]  # 1 prompt of ~100 tokens: chunks of 16 vs one pass per layer group
    outputs, bytes_h2d = {}, {}
    for policy, predictor, slots in (("chunked@16", "learned", 4), ("layered", "gate-ahead", 8)):
        want = serve(model, "jax", prompts, policy=policy)[0]
        got, engine = serve(model, "offload", prompts, policy=policy, predictor=predictor, device_expert_slots=slots,
                            predictor_path=shipped_checkpoint("stdlib-moe") / PREDICTOR_DIR)
        assert got == want, (policy, predictor)
        assert engine.executor.offload_summary()["loads_prefetch"] > 0  # the predictor acted
    for policy in ("chunked@16", "layered"):
        outputs[policy], engine = serve(model, "offload", long_prompt, policy=policy, device_expert_slots=8)
        bytes_h2d[policy] = engine.executor.offload_summary()["bytes_h2d"]
    assert outputs["layered"] == outputs["chunked@16"]
    assert bytes_h2d["layered"] < bytes_h2d["chunked@16"]


def test_bytes_moved_counted_by_hand(models):
    """All experts fit (slots = E), nothing is predicted: each layer loads every expert the request
    touches exactly once, one expert being D*2F + F*D fp32 numbers."""
    model = models[FAST_ARCH]
    cfg = model.config
    prompt = prompts_for(cfg.vocab_size, seed=4)[1][:9]
    out, engine = serve(model, "offload", [prompt], device_expert_slots=cfg.num_experts, predictor="none")
    processed = prompt + out[0][:-1]  # every token the model ran
    ids = prompt_routing(model, processed)  # [n, L, K], the same routing in one forward
    distinct = sum(len(np.unique(ids[:, l])) for l in range(cfg.num_layers))
    expert_bytes = (cfg.hidden_size * 2 * cfg.moe_intermediate_size + cfg.moe_intermediate_size * cfg.hidden_size) * 4
    s = engine.executor.offload_summary()
    assert s["expert_bytes"] == expert_bytes
    assert s["bytes_h2d"] == engine.executor.cache.bytes_h2d == distinct * expert_bytes
    assert s["loads_on_demand"] == distinct and s["loads_prefetch"] == s["loads_transient"] == 0
    needed = sum(len(np.unique(ids[:len(prompt), l])) for l in range(cfg.num_layers)) \
        + (len(processed) - len(prompt)) * cfg.num_layers * cfg.num_experts_per_tok  # prefill pass + each decode pass
    assert s["hit_rate"] == pytest.approx(1 - distinct / needed)


def test_experts_live_in_host_memory_and_the_device_copies_go():
    engine = build("tiny-qwen3-moe", "offload", device_expert_slots=6, max_model_len=64)
    ex = engine.executor
    kinds = {m.kind for m in jax.devices()[0].addressable_memories()}
    want = "pinned_host" if "pinned_host" in kinds else "unpinned_host"
    assert ex.host.memory_kind == want
    assert ex.host.gate_up[0][3].sharding.memory_kind == want and ex.host.down[0][3].shape == (64, 128)
    assert ex.cache.buffers[0][0].sharding.memory_kind == "device" and ex.cache.buffers[0][0].shape == (6, 128, 128)
    assert ex.model.expert_states[0]["w_gate_up"][...].is_deleted()  # loaded by name: the executor owns the model


@pytest.mark.slow
def test_host_path_matches(models, reference):
    """With the host's experts free (host time 0), the scheduler sends every miss to the host: nothing
    is loaded, and the routed experts' partial sums give the same greedy tokens."""
    model = models[FAST_ARCH]
    want = reference(FAST_ARCH, "chunked@16")
    engine = build(model, "offload", max_model_len=128, block_size=4, device_expert_slots=4, host_compute=True,
                   policy="chunked@16")
    engine.executor.host_s = lambda tokens: np.zeros(len(tokens))
    requests = [engine.add_request(p, GREEDY) for p in prompts_for(model.config.vocab_size)]
    while engine.has_unfinished:
        engine.step()
    s = engine.executor.offload_summary()
    assert [r.output_token_ids for r in requests] == want
    assert s["host_experts"] > 0 and s["loads_on_demand"] == 0 and s["bytes_h2d"] == 0


def test_bad_settings_are_named(models):
    model = models["tiny-qwen3-moe"]
    with pytest.raises(ValueError, match=r"device_expert_slots=3: fewer slots than the 4 experts one token"):
        build(model, "offload", device_expert_slots=3, max_model_len=64)
    dense = get_preset("tiny-qwen3-moe").replace(name="tiny-dense", num_experts=0, num_experts_per_tok=0,
                                                 moe_intermediate_size=0, dense_intermediate_size=256,
                                                 moe_layers=(False,) * 4)
    with pytest.raises(ValueError, match="expert offload needs an MoE model: tiny-dense is dense"):
        build(build_model(dense), "offload", max_model_len=64)
    shipped = shipped_checkpoint("stdlib-moe") / PREDICTOR_DIR
    with pytest.raises(PredictorError, match="trained for model 'stdlib-moe'.*not for 'tiny-qwen3-moe'"):
        build(model, "offload", predictor="learned", predictor_path=shipped, max_model_len=64)
    with pytest.raises(PredictorError, match="give predictor_path="):
        build(model, "offload", predictor="learned", max_model_len=64)
    with pytest.raises(ValueError, match="one device"):
        build(load_model("tiny-qwen3-moe", layout="cpu8-ep")[0], "offload", max_model_len=64)
