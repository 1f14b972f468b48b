"""The tile map, what the tiled kernels skip, the interpreters' output poisoning the backend tests
rely on, and the dispatch rules."""

import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from moejax import kernels
from moejax.kernels import mosaic_gpu, tile_map


def random_sizes(rng, G, R):
    """R rows over G groups, from spread out to piled into a few groups (many empty)."""
    hot = rng.integers(1, G + 1)
    return np.bincount(rng.integers(0, hot, R) * (G // hot), minlength=G)[:G]


@pytest.mark.parametrize("G,R", [(1, 5), (7, 60), (40, 33), (256, 301)])
@pytest.mark.parametrize("block_m", [1, 8, 64])
def test_tile_rows_place_each_group_in_its_own_tiles(G, R, block_m):
    rng = np.random.default_rng([G, R, block_m])
    place = jax.jit(tile_map.tile_rows, static_argnums=(1, 2))
    for _ in range(20):
        sizes = random_sizes(rng, G, int(rng.integers(0, R + 1)))
        tiles, slot, num_slots = place(jnp.asarray(sizes), R, block_m)
        tiles, slot = jax.tree.map(np.asarray, (tiles, slot))
        need = -(-sizes // block_m)  # ceil: tiles per group
        assert tiles.active == need.sum() and num_slots == len(tiles.group) * block_m
        assert len(tiles.group) >= tiles.active  # the static bound holds
        expected_group = np.repeat(np.arange(G), need)
        np.testing.assert_array_equal(tiles.group[:tiles.active], expected_group)
        if tiles.active:  # inactive tiles repeat the last active tile's group
            assert (tiles.group[tiles.active:] == expected_group[-1]).all()
        rows = np.arange(sizes.sum())
        assert (slot[sizes.sum():] == num_slots).all()  # rows past the groups go nowhere
        assert len(set(slot[rows])) == len(rows)  # one row per slot
        np.testing.assert_array_equal(tiles.group[slot[rows] // block_m], np.repeat(np.arange(G), sizes))


def test_max_tiles_is_tight_and_ignores_absent_experts():
    # k - 1 groups of one row and one group with the rest reach the bound k + (R - k) // bm.
    for G, R, bm in [(8, 100, 16), (256, 64, 64), (4, 3, 8), (128, 2048, 64)]:
        k = min(G, R)
        sizes = np.zeros(G, int)
        sizes[:k - 1], sizes[k - 1] = 1, R - (k - 1)
        tiles, _, _ = tile_map.tile_rows(jnp.asarray(sizes), R, bm)
        assert int(tiles.active) == tile_map.max_tiles(R, G, bm) == len(tiles.group)
    # Decode: 8 tokens x top-8 over 256 experts is at most 64 tiles, not 256.
    assert tile_map.max_tiles(64, 256, 64) == 64


def tiled_problem(rng, dtype, D=128, F=256):
    """A tiled buffer with group 1 and 3 absent: their weights are NaN, and every row of an
    inactive tile is 1.0 (so computing it would give finite non-zero output)."""
    sizes = np.array([5, 0, 70, 0])
    bm = 64
    tiles, slot, num_slots = tile_map.tile_rows(jnp.asarray(sizes), int(sizes.sum()), bm)
    active = int(tiles.active)
    x = np.ones((num_slots, D))
    x[:active * bm] = rng.normal(size=(active * bm, D))
    w_gate_up = rng.normal(size=(4, D, 2 * F)) / np.sqrt(D)
    w_down = rng.normal(size=(4, F, D)) / np.sqrt(F)
    w_gate_up[[1, 3]] = np.nan
    w_down[[1, 3]] = np.nan
    return tiles, bm, active, *(jnp.asarray(a, dtype) for a in (x, w_gate_up, w_down))


@pytest.mark.parametrize("name", ["cpu", "pallas", "mosaic_gpu"])
def test_tiled_kernels_skip_inactive_tiles_and_absent_experts(name):
    rng = np.random.default_rng(0)
    tiles, bm, active, x, w_gate_up, w_down = tiled_problem(rng, jnp.bfloat16)
    k = kernels.BACKENDS[name].kernels
    cfg = dataclasses.replace(k.config(int(x.shape[0]), 4, 128, 256, jnp.dtype(jnp.bfloat16)), block_m=bm)
    # The reference (XLA:CPU's ragged_dot computes every group densely) gets the absent experts
    # zeroed; the active tiles hold groups 0 and 2 as whole tiles.
    ref, rows = kernels.BACKENDS["reference"], active * bm
    w_gate_up0, w_down0 = (jnp.nan_to_num(w) for w in (w_gate_up, w_down))
    sizes = jnp.asarray(np.bincount(tiles.group[:active], minlength=4) * bm)
    for got, want in [
        (k.ffn(x, w_gate_up, w_down, tiles, cfg, "silu", jnp.float32),
         ref.expert_ffn(x[:rows], w_gate_up0, w_down0, sizes)),
        (k.gmm(x, w_down.transpose(0, 2, 1), tiles, cfg, jnp.float32),
         ref.grouped_matmul(x[:rows], w_down0.transpose(0, 2, 1), sizes)),
    ]:
        got = np.asarray(got)
        np.testing.assert_allclose(got[:rows], np.asarray(want), rtol=1e-2, atol=1e-2 * np.abs(want).max())
        inactive = got[rows:]
        assert ((inactive == 0) | np.isnan(inactive)).all(), "an inactive tile was computed"


def test_interpreters_poison_unwritten_outputs():
    """What makes the backend tests' "every element written" check real: an output the kernel never
    writes comes back NaN from both interpreters."""
    def write_half(x_ref, o_ref):
        o_ref[:4] = x_ref[:4]

    x = jnp.ones((8, 128), jnp.float32)
    out = pl.pallas_call(write_half, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), interpret=True)(x)
    assert np.isfinite(out[:4]).all() and np.isnan(out[4:]).all()

    def write_half_gpu(x_gmem, o_gmem):
        @pl.when(jax.lax.axis_index("sm") == 0)
        def _():
            o_gmem[:4] = x_gmem[:4]

    out = plgpu.kernel(write_half_gpu, out_type=jax.ShapeDtypeStruct(x.shape, x.dtype), grid=(2,),
                       grid_names=("sm",), interpret=plgpu.InterpretGPUParams())(x)
    assert np.isfinite(out[:4]).all() and np.isnan(out[4:]).all()


def test_dispatch_by_platform(monkeypatch):
    assert kernels.backend_for() == "cpu"  # tests run on CPU, no override
    assert kernels.platform_backend("tpu") == "pallas"
    for cc, want in [("9.0", "mosaic_gpu"), ("8.0", "reference"), ("10.0", "reference")]:
        monkeypatch.setattr(jax, "devices", lambda *_, cc=cc: [types.SimpleNamespace(compute_capability=cc)])
        assert kernels.platform_backend("gpu") == want


def test_overrides_and_errors(monkeypatch):
    with kernels.use_backend("pallas"):
        with kernels.use_backend("reference"):
            assert kernels.backend_for() == "reference"
        assert kernels.backend_for() == "pallas"
    monkeypatch.setenv("MOEJAX_KERNEL_BACKEND", "mosaic_gpu")
    assert kernels.backend_for() == "mosaic_gpu"
    monkeypatch.setenv("MOEJAX_KERNEL_BACKEND", "nope")
    with pytest.raises(ValueError, match="nope"):
        kernels.backend_for()
    with pytest.raises(ValueError, match="unknown kernel backend"):
        kernels.use_backend("nope").__enter__()
    x, w = jnp.ones((4, 128), jnp.float32), jnp.ones((2, 128, 128), jnp.float32)
    with pytest.raises(ValueError, match="w_gate_up"):
        kernels.expert_ffn(x, w, w, jnp.array([2, 2]), backend="reference")


def test_unsupported_problem_falls_back_only_when_not_asked_for(monkeypatch):
    """fp32 is outside the wgmma kernels' domain: asked for by name it raises; picked by platform
    (a Hopper GPU) the call runs on the reference backend instead."""
    x, w = jnp.ones((4, 128), jnp.float32), jnp.ones((2, 128, 256), jnp.float32)
    with pytest.raises(ValueError, match="mosaic_gpu.*bf16"):
        kernels.grouped_matmul(x, w, jnp.array([2, 2]), backend="mosaic_gpu")
    monkeypatch.setattr(kernels, "platform_backend", lambda platform=None: "mosaic_gpu")
    got = kernels.grouped_matmul(x, w, jnp.array([2, 2]))
    np.testing.assert_array_equal(got, np.full((4, 256), 128.0))


@pytest.mark.parametrize("shape_class", ["decode", "prefill"])  # warpgroups split columns / rows
def test_mosaic_gpu_kernels_are_race_free(shape_class):
    """The interpreter's happens-before race detector over both kernels (SMEM ring, epilogue
    stores, two compute warpgroups and the TMA warpgroup)."""
    from jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call import get_races

    cfg = dataclasses.replace(mosaic_gpu.BLOCKS["H100"][shape_class], num_sms=2)
    rng = np.random.default_rng(1)
    sizes = np.array([cfg.block_m + 5, 0, 9])
    tiles, slot, num_slots = tile_map.tile_rows(jnp.asarray(sizes), int(sizes.sum()), cfg.block_m)
    x = jnp.asarray(rng.normal(size=(num_slots, 128)), jnp.bfloat16)
    w_gate_up, w_down = (jnp.asarray(rng.normal(size=s) / 12, jnp.bfloat16) for s in [(3, 128, 256), (3, 128, 128)])
    with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams(detect_races=True)):
        h = jax.block_until_ready(mosaic_gpu.gate_up(x, w_gate_up, tiles, cfg, "silu"))
        assert not get_races().races_found
        jax.block_until_ready(mosaic_gpu.gmm(h, w_down, tiles, cfg, jnp.float32))
        assert not get_races().races_found
