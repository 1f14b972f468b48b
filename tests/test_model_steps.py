"""A layer in its steps (attend / route / experts / combine) equals the fused layer, on the model's own
experts and on an expert cache holding them in other slots; a missing expert is an error in debug
mode; attention and experts on disjoint devices of one process give the same layer."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding

from moejax.checkpoint import load_model
from moejax.config import get_preset
from moejax.engine.metadata import attention_metadata, pad_tokens
from moejax.models.model import build_model

ARCHS = ["tiny-qwen3-moe", "tiny-mixtral", "tiny-qwen2-moe", "tiny-olmoe", "tiny-gpt-oss"]
BS = 4


def prefill_inputs(model, n=13, seed=0, shards=1):
    tokens = np.random.default_rng(seed).integers(0, model.config.vocab_size, n)
    meta = attention_metadata(np.arange(n), np.zeros(n), np.arange(8)[None], BS, 8 * shards,
                              row_bucket=shards * 16)
    return model.embed(pad_tokens(tokens, meta.positions.shape[0])), meta


def cache_holding(model, i, needed, rng, num_slots):
    """An expert buffer of num_slots slots holding `needed` (and some others) of layer i in random
    slots, the rest garbage -> (buffer, slot_of [E])."""
    E = model.config.num_experts
    held = np.union1d(needed, rng.choice(E, num_slots - len(needed), replace=False)) if num_slots > len(needed) \
        else np.asarray(needed)
    held = rng.permutation(held)[:num_slots]
    assert set(needed) <= set(held)
    slots = rng.permutation(num_slots)[:len(held)]
    slot_of = np.full(E, -1, np.int32)
    slot_of[held] = slots
    buffer = []
    for w in map(np.asarray, model.expert_weights(i)):  # weights (and biases of biased experts)
        slot_array = np.full((num_slots, *w.shape[1:]), 3.0, w.dtype)
        slot_array[slots] = w[held]
        buffer.append(jax.numpy.asarray(slot_array))
    return tuple(buffer), jax.numpy.asarray(slot_of)


@pytest.mark.parametrize("arch", ARCHS)
def test_layer_in_steps_equals_fused_layer(arch):
    model = build_model(get_preset(arch), seed=4)
    rng = np.random.default_rng(1)
    x, meta = prefill_inputs(model)
    kv_fused, kv_steps = model.init_kv_cache(8, BS), model.init_kv_cache(8, BS)
    for i in range(model.config.num_layers):
        want, kv_fused[i], counts = model.layer(i, x, kv_fused[i], meta)
        h, kv_steps[i] = model.attend(i, x, kv_steps[i], meta)
        y, weights, ids = model.route(i, h, meta.valid)
        if ids is None:
            assert not model.config.moe_layers[i]
            got = [model.combine(i, h, y, None)]
        else:
            needed = np.unique(np.asarray(ids)[np.asarray(meta.valid)])
            np.testing.assert_array_equal(np.asarray(counts)[needed] > 0, True)
            assert np.asarray(counts).sum() == np.asarray(meta.valid).sum() * model.config.num_experts_per_tok
            own = model.combine(i, h, y, model.experts(y, ids, weights, model.expert_weights(i)))
            buffer, slot_of = cache_holding(model, i, needed, rng, num_slots=len(needed) + 2)
            cached = model.combine(i, h, y, model.experts(y, ids, weights, buffer, slot_of))
            got = [own, cached]
        for g in got:
            np.testing.assert_allclose(np.asarray(g), np.asarray(want), rtol=1e-5, atol=1e-5, err_msg=f"layer {i}")
        for a, b in zip(kv_fused[i], kv_steps[i]):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        x = want


def test_missing_expert_is_an_error_in_debug_mode(monkeypatch):
    monkeypatch.setenv("MOEJAX_DEBUG", "1")
    model = build_model(get_preset("tiny-qwen3-moe"), seed=4)
    x, meta = prefill_inputs(model)
    h, _ = model.attend(0, x, model.init_kv_cache(8, BS)[0], meta)
    y, weights, ids = model.route(0, h, meta.valid)
    needed = np.unique(np.asarray(ids)[np.asarray(meta.valid)])
    buffer, slot_of = cache_holding(model, 0, needed, np.random.default_rng(0), len(needed))
    jax.block_until_ready(model.experts(y, ids, weights, buffer, slot_of))  # all there: fine
    missing = int(needed[0])
    with pytest.raises(Exception, match=rf"routed to experts \[{missing}\] that the expert buffer does not hold"):
        jax.block_until_ready(model.experts(y, ids, weights, buffer, slot_of.at[missing].set(-1)))


def test_attention_and_experts_on_disjoint_devices():
    """One process, 8 CPU devices: attention (data-parallel) on devices 0-3, experts (expert-parallel)
    on 4-7; rows cross between the two meshes with jax.device_put. Every layer equals the
    single-device fused layer."""
    arch = "tiny-qwen3-moe"
    split, _ = load_model(arch, seed=5, layout="cpu8-attn4-exp4")
    attention, experts = split.placements.attention, split.placements.experts
    assert {d.id for d in attention.mesh.devices.flat}.isdisjoint(d.id for d in experts.mesh.devices.flat)
    assert split.layer_states[0]["attn"]["w_q"][...].sharding.mesh == attention.mesh
    assert split.expert_states[0]["w_gate_up"][...].sharding.spec[0] == "expert"
    with pytest.raises(ValueError, match="different devices"):
        split.placement  # no fused program spans both meshes

    single = build_model(get_preset(arch), seed=5)
    x, meta = prefill_inputs(single, shards=4)
    kv_single = single.init_kv_cache(8 * 4, BS)
    kv_split = split.init_kv_cache(8 * 4, BS)

    def to(placement, a, axes):
        return jax.device_put(a, NamedSharding(placement.mesh, placement.layout.spec(axes)))

    x_split = to(attention, x, ("batch", None))
    for i in range(single.config.num_layers):
        want, kv_single[i], _ = single.layer(i, x, kv_single[i], meta)
        h, kv_split[i] = split.attend(i, x_split, kv_split[i], meta)
        y, weights, ids = split.route(i, h, meta.valid)
        routed = split.experts(to(experts, y, (None, None)), to(experts, ids, (None, None)),
                               to(experts, weights, (None, None)), split.expert_weights(i))
        assert routed.sharding.mesh == experts.mesh
        x_split = split.combine(i, h, y, to(attention, routed, ("batch", None)))
        valid = np.asarray(meta.valid)  # padding rows of other request shards read other KV blocks
        np.testing.assert_allclose(np.asarray(x_split)[valid], np.asarray(want)[valid], rtol=1e-5, atol=1e-5,
                                   err_msg=f"layer {i}")
        x = want
