"""DeepSeek's pieces on their own: latent paged attention in both forms (absorbed == naive == a float64
dense reference, prefill and decode rows over several context lengths), the rope layouts, grouped
routing against a brute-force reference, and DeepSeek configs and checkpoints read or rejected by name."""

import json
import shutil
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from moejax import kernels
from moejax.kernels.latent_attention import naive_is_cheaper
from moejax.kernels.paged_attention import TILE
from moejax.checkpoint import CheckpointError, load_hf
from moejax.checkpoint.safetensors_file import SafetensorsFile
from moejax.config import ConfigError, get_preset, load_hf_config
from moejax.models.layers import Rope
from moejax.models.moe import Routing, route

FIXTURES = Path(__file__).parent / "fixtures" / "hf"

# --- latent paged attention ---------------------------------------------------------------------------

H, R, NOPE, ROPE, V, BS = 4, 16, 8, 6, 10, 4
LENS = (3, 9, 70)  # three sequences, blocks scattered over the pool


@pytest.fixture(scope="module")
def latent_problem():
    rng = np.random.default_rng(0)
    nb = 32
    perm = rng.permutation(nb)
    tables = np.zeros((len(LENS), 20), np.int32)
    used = 0
    for s, n in enumerate(LENS):
        tables[s, :-(-n // BS)] = perm[used:used - (-n // BS)]
        used -= -n // BS
    return dict(
        latent_cache=rng.normal(size=(nb, BS, R)).astype(np.float32),
        rope_cache=rng.normal(size=(nb, BS, ROPE)).astype(np.float32),
        w_uk=(rng.normal(size=(R, H, NOPE)) / np.sqrt(R)).astype(np.float32),
        w_uv=(rng.normal(size=(R, H, V)) / np.sqrt(R)).astype(np.float32),
        tables=tables, rng=rng)


def dense_reference(p, q_nope, q_rope, seq, positions, scale):
    """float64: decompress the sequence's whole cache, then causal softmax attention per head."""
    flat = np.concatenate([np.arange(b * BS, b * BS + BS) for b in p["tables"][seq, :-(-LENS[seq] // BS)]])
    latent = p["latent_cache"].reshape(-1, R)[flat].astype(np.float64)
    k_rope = p["rope_cache"].reshape(-1, ROPE)[flat].astype(np.float64)
    k_nope = np.einsum("lc,chn->lhn", latent, p["w_uk"].astype(np.float64))
    v = np.einsum("lc,chv->lhv", latent, p["w_uv"].astype(np.float64))
    out = np.zeros((len(positions), H, V))
    for t, pos in enumerate(positions):
        s = (np.einsum("hn,lhn->lh", q_nope[t], k_nope[:pos + 1]) + k_rope[:pos + 1] @ q_rope[t].T) * scale
        w = np.exp(s - s.max(axis=0))
        out[t] = np.einsum("lh,lhv->hv", w / w.sum(axis=0), v[:pos + 1])
    return out


ROW_SETS = {
    # a prompt chunk of sequence 2 filling whole tiles and a partial one, a chunk of sequence 1, a decode row
    "prefill": [(2, p) for p in range(0, 70)] + [(1, p) for p in range(4, 9)] + [(0, 2)],
    # decode rows only, one per sequence and context length 3, 9, 34, 70
    "decode": [(0, 2), (1, 8), (2, 33), (2, 69)],
}


@pytest.mark.parametrize("method", ["rows", "tiles"])
def test_absorbed_equals_naive_equals_dense_reference(latent_problem, method):
    p = latent_problem
    scale = (NOPE + ROPE) ** -0.5
    attend = {form: jax.jit(partial(kernels.paged_latent_attention, scale=scale, form=form, method=method))
              for form in ("absorbed", "naive")}
    for rows in ROW_SETS.values():
        seq_ids = np.array([s for s, _ in rows], np.int32)
        positions = np.array([q for _, q in rows], np.int32)
        q_nope = p["rng"].normal(size=(len(rows), H, NOPE)).astype(np.float32)
        q_rope = p["rng"].normal(size=(len(rows), H, ROPE)).astype(np.float32)
        out = {form: np.asarray(fn(q_nope, q_rope, p["latent_cache"], p["rope_cache"], p["w_uk"], p["w_uv"], positions,
                                   seq_ids, p["tables"], np.int32(positions.max() // BS + 1)))
               for form, fn in attend.items()}
        np.testing.assert_allclose(out["absorbed"], out["naive"], rtol=1e-5, atol=1e-5)
        for s in set(seq_ids.tolist()):
            mask = seq_ids == s
            want = dense_reference(p, q_nope[mask].astype(np.float64), q_rope[mask].astype(np.float64), s,
                                   positions[mask], scale)
            for form, got in out.items():
                np.testing.assert_allclose(got[mask], want, rtol=1e-5, atol=1e-5, err_msg=f"{form}, sequence {s}")


def test_naive_form_pays_off_only_for_many_rows():
    shapes = dict(kv_lora_rank=512, nope=128, rope=64, v=128)  # DeepSeek-V2/V3's
    assert not naive_is_cheaper(1, **shapes)  # decode: absorbed
    assert not naive_is_cheaper(TILE, **shapes)
    assert naive_is_cheaper(512, **shapes)


# --- rope layouts ---------------------------------------------------------------------------------------

def test_interleaved_rope_rotates_adjacent_pairs():
    """Interleaved (DeepSeek) rotates (x0, x1), (x2, x3), ...: rotate-half applied to the de-interleaved
    vector (evens, then odds) gives the same numbers, laid out evens' rotations first."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(5, 3, 8)).astype(np.float32)
    positions = jnp.asarray([0, 1, 7, 30, 200])
    inv_freq = tuple(float(f) for f in 1.0 / 100.0 ** (np.arange(4) / 4))
    interleaved = Rope(inv_freq, 1.3, interleaved=True)(jnp.asarray(x), positions)
    halves = Rope(inv_freq, 1.3)(jnp.asarray(np.concatenate([x[..., 0::2], x[..., 1::2]], axis=-1)), positions)
    np.testing.assert_allclose(np.asarray(interleaved), np.asarray(halves), rtol=1e-6, atol=1e-6)
    angle = 7 * inv_freq[1]  # pair (x2, x3) of row 2 turns by position 7 x frequency 1, scaled by 1.3
    c, s = np.cos(angle) * 1.3, np.sin(angle) * 1.3
    got = np.asarray(interleaved)[2, 0]
    np.testing.assert_allclose([got[1], got[5]], [x[2, 0, 2] * c - x[2, 0, 3] * s, x[2, 0, 3] * c + x[2, 0, 2] * s],
                               rtol=1e-5)


# --- routing --------------------------------------------------------------------------------------------

def reference_route(logits, routing: Routing, bias):
    """Row by row in float64: scores, kept groups, the k best allowed experts by biased score, their
    unbiased scores as weights."""
    ids, weights = [], []
    for row in logits.astype(np.float64):
        scores = np.exp(row - row.max()) / np.exp(row - row.max()).sum() if routing.scoring == "softmax" \
            else 1 / (1 + np.exp(-row))
        choice = scores + (0 if bias is None else bias)
        per = len(row) // routing.groups
        groups = [sorted(choice[g * per:(g + 1) * per], reverse=True) for g in range(routing.groups)]
        group_score = [g[0] if routing.group_score == "max" else g[0] + g[1] for g in groups]
        kept = sorted(range(routing.groups), key=lambda g: -group_score[g])[:routing.topk_groups]
        allowed = [e for e in range(len(row)) if e // per in kept]
        chosen = sorted(allowed, key=lambda e: -choice[e])[:routing.top_k]
        w = scores[chosen]
        if routing.normalize:
            w = w / w.sum()
        ids.append(chosen)
        weights.append(w * routing.scaling)
    return np.array(ids), np.array(weights)


@pytest.mark.parametrize("routing,biased", [
    (Routing(top_k=3, normalize=False, groups=4, topk_groups=2, scaling=2.0), False),  # DeepSeek-V2
    (Routing(3, True, "sigmoid", groups=4, topk_groups=2, group_score="top2_sum", scaling=2.5), True),  # V3
    (Routing(4, True), False),  # plain softmax top-k (Mixtral, Qwen3)
], ids=["v2-group-limited", "v3-sigmoid-bias", "softmax"])
def test_grouped_routing_matches_brute_force(routing, biased):
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(64, 16)).astype(np.float32) * 2
    bias = rng.normal(size=16).astype(np.float32) * 0.3 if biased else None
    weights, ids = (np.asarray(a) for a in route(jnp.asarray(logits), routing, None if bias is None else jnp.asarray(bias)))
    want_ids, want_weights = reference_route(logits, routing, bias)
    order = np.argsort(ids, axis=1)
    want_order = np.argsort(want_ids, axis=1)
    np.testing.assert_array_equal(np.take_along_axis(ids, order, 1), np.take_along_axis(want_ids, want_order, 1))
    np.testing.assert_allclose(np.take_along_axis(weights, order, 1), np.take_along_axis(want_weights, want_order, 1),
                               rtol=1e-5)
    if routing.groups > 1:  # the groups limit the choice on this data: ignoring them would fail above
        free = reference_route(logits, Routing(routing.top_k, routing.normalize, routing.scoring), bias)[0]
        assert (np.sort(free, 1) != np.sort(want_ids, 1)).any()
    if biased:  # the bias changes some choices on this data: dropping it would fail above
        assert (np.sort(reference_route(logits, routing, None)[0], 1) != np.sort(want_ids, 1)).any()


# --- configs and checkpoints --------------------------------------------------------------------------------

def test_hf_configs_read_as_transformers_runs_them():
    v2, v3 = load_hf_config(FIXTURES / "deepseek_v2"), load_hf_config(FIXTURES / "deepseek_v3")
    assert v2.mla.q_lora_rank is None and v3.mla.q_lora_rank == 24
    for cfg in (v2, v3):
        assert cfg.moe_layers == (False, True, True) and cfg.head_dim == 24 and cfg.num_kv_heads == cfg.num_heads
        assert cfg.shared_expert_intermediate_size == cfg.moe_intermediate_size * (2 if cfg is v2 else 1)
        assert (cfg.router_groups, cfg.router_topk_groups) == (4, 2) and cfg.router_fp32
    assert (v2.router_scoring, v2.router_group_score, v2.router_score_bias, v2.norm_topk_prob) == \
        ("softmax", "max", False, False)
    assert (v3.router_scoring, v3.router_group_score, v3.router_score_bias, v3.norm_topk_prob) == \
        ("sigmoid", "top2_sum", True, True)
    assert (v2.routed_scaling_factor, v3.routed_scaling_factor) == (2.0, 2.5)


def copy_fixture(tmp_path, name, **config_changes):
    d = tmp_path / name
    shutil.copytree(FIXTURES / name, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(config_changes)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("changes,message", [
    (dict(n_group=3), r"router_groups: 3 groups do not split num_experts=16 evenly"),
    (dict(topk_group=5), r"router_topk_groups: must be in \[1, router_groups=4\], got 5"),
    (dict(num_experts_per_tok=9), r"num_experts_per_tok: 9 experts do not fit in router_topk_groups=2 groups of 4"),
    (dict(attention_bias=True), r"attention_bias=True is not supported for deepseek_v3"),
    (dict(scoring_func="softmax"), r"scoring_func 'softmax' is not supported for deepseek_v3"),
    (dict(kv_lora_rank=None), r"missing field kv_lora_rank"),
])
def test_bad_deepseek_configs_are_named(tmp_path, changes, message):
    with pytest.raises(ConfigError, match=message):
        load_hf_config(copy_fixture(tmp_path, "deepseek_v3", **changes))


def test_bad_mla_shape_is_named():
    cfg = get_preset("tiny-deepseek-v2")
    with pytest.raises(ConfigError, match=r"head_dim: is the q/k head width under MLA: qk_nope_head_dim \+ "
                                          r"qk_rope_head_dim = 24, got 32"):
        cfg.replace(head_dim=32)


def test_checkpoint_tensors_named_and_mtp_layers_skipped(tmp_path):
    d = copy_fixture(tmp_path, "deepseek_v3")
    f = SafetensorsFile(d / "model.safetensors")
    t = {k: np.array(f.tensor(k)) for k in f.keys()}
    # DeepSeek-V3 stores its multi-token-prediction module as the layer after the last: skipped
    t["model.layers.3.eh_proj.weight"] = np.zeros((4, 4), np.float32)
    kv_b = t.pop("model.layers.2.self_attn.kv_b_proj.weight")
    save_file(t, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing tensor: model\.layers\.2\.self_attn\.kv_b_proj\.weight "
                                              r"\(for layers\.2\.attn\.w_kv_b, shape \[128, 32\]\)"):
        load_hf(d)
    t["model.layers.2.self_attn.kv_b_proj.weight"] = kv_b
    save_file(t, str(d / "model.safetensors"))
    model = load_hf(d, dtype="bfloat16")
    assert model.layer_states[2]["attn"]["w_kv_b"][...].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(model.layer_states[2]["attn"]["w_kv_b"][...], np.float32),
                                  kv_b.T.astype(jnp.bfloat16).astype(np.float32))
    bias = model.layer_states[1]["router"]["score_bias"][...]  # kept in fp32, as DeepSeek-V3 keeps it
    assert bias.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(bias), t["model.layers.1.mlp.gate.e_score_correction_bias"])
