"""Paged attention against a float64 numpy dense causal attention, on scattered block tables, with
and without sliding windows and attention sinks."""

import importlib

import jax.numpy as jnp
import numpy as np
import pytest

from moejax import kernels
from moejax.kernels import native


def dense_reference(q, k_seq, v_seq, positions, window, sinks=None):
    """q: [T, H, hd] for one sequence's rows at `positions`; k_seq/v_seq: [L, KV, hd] its whole KV;
    sinks: [H] logits in each head's softmax denominator (no value), as transformers' GPT-OSS adds them."""
    T, H, hd = q.shape
    KV = k_seq.shape[1]
    out = np.zeros((T, H, hd))
    for t in range(T):
        for h in range(H):
            keys = np.arange(positions[t] + 1)
            if window is not None:
                keys = keys[keys > positions[t] - window]
            s = (k_seq[keys, h // (H // KV)] @ q[t, h]) / np.sqrt(hd)
            if sinks is not None:
                s = np.append(s, sinks[h])
            p = np.exp(s - s.max())
            p = p / p.sum()
            out[t, h] = p[:len(keys)] @ v_seq[keys, h // (H // KV)]
    return out


# every method without sinks; sinks on the jnp methods and the Pallas kernel (the native CPU one has
# none); the Pallas kernel (interpreted on CPU: seconds a call) on two cases of each
CASES = [(H, KV, w, False, m) for H, KV in [(4, 2), (4, 4), (6, 1)] for w in (None, 5)
         for m in ("rows", "tiles", "auto", "native")] + \
        [(H, KV, w, True, m) for H, KV, w in [(4, 2, None), (6, 1, 5)] for m in ("rows", "tiles", "auto")] + \
        [(4, 2, None, False, "pallas"), (6, 1, 5, True, "pallas")]


@pytest.mark.parametrize("H,KV,window,with_sinks,method", CASES)
def test_paged_attention_matches_dense(H, KV, window, with_sinks, method):
    rng = np.random.default_rng([H, KV, window or 0, with_sinks])
    bs, nb, hd = 4, 24, 8
    tables_width = 10
    lens = [3, 9, 34]  # three sequences, blocks scattered over the pool
    perm = rng.permutation(nb)
    tables = np.zeros((len(lens), tables_width), np.int32)
    k_cache = rng.normal(size=(nb, bs, KV, hd)).astype(np.float32)
    v_cache = rng.normal(size=(nb, bs, KV, hd)).astype(np.float32)
    used = 0
    for s, n in enumerate(lens):
        nblk = -(-n // bs)
        tables[s, :nblk] = perm[used:used + nblk]
        used += nblk
    # rows: a prefill slice of seq 2 long enough to fill whole tiles (positions 0..33, so tiles of
    # one sequence and a tile shared with the next rows), a slice of seq 1, the last token of seq 0
    rows = [(2, p) for p in range(0, 34)] + [(1, p) for p in range(4, 9)] + [(0, 2), (2, 13)]
    seq_ids = np.array([s for s, _ in rows], np.int32)
    positions = np.array([p for _, p in rows], np.int32)
    q = rng.normal(size=(len(rows), H, hd)).astype(np.float32)
    sinks = rng.normal(size=H).astype(np.float32) * 2 if with_sinks else None
    out = kernels.paged_attention(q, k_cache, v_cache, positions, seq_ids, tables,
                                  np.int32(positions.max() // bs + 1), scale=hd ** -0.5, window=window,
                                  sinks=sinks, method=method)
    for s, n in enumerate(lens):
        mask = seq_ids == s
        flat = np.concatenate([np.arange(b * bs, b * bs + bs) for b in tables[s, :-(-n // bs)]])
        k_seq = k_cache.reshape(-1, KV, hd)[flat].astype(np.float64)
        v_seq = v_cache.reshape(-1, KV, hd)[flat].astype(np.float64)
        ref = dense_reference(q[mask].astype(np.float64), k_seq, v_seq, positions[mask], window, sinks)
        np.testing.assert_allclose(np.asarray(out)[mask], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method,with_sinks", [("rows", False), ("rows", True), ("tiles", False), ("tiles", True),
                                               ("native", False), ("pallas", True)])
def test_windowed_rows_read_no_block_before_their_window(method, with_sinks):
    """A window-aware cache frees the blocks before a request's window and hands them to others:
    here they hold NaN, so reading any of them (even masked) would poison the output. A prompt
    chunk filling a whole tile (the tiles method's one-sequence path), a chunk sharing a tile with
    decode rows, and decode rows deep into their sequences."""
    rng = np.random.default_rng([3, with_sinks])
    bs, hd, H, KV, window, width = 4, 8, 4, 2, 6, 24
    rows = [(0, p) for p in range(40, 72)] + [(1, p) for p in range(20, 25)] + [(2, 57), (3, 9)]
    lens = [72, 25, 58, 10]
    nb = sum(-(-n // bs) for n in lens) + 1  # the last block: what unused table entries point at
    k_cache = rng.normal(size=(nb, bs, KV, hd)).astype(np.float32)
    v_cache = rng.normal(size=(nb, bs, KV, hd)).astype(np.float32)
    tables = np.full((len(lens), width), nb - 1, np.int32)
    perm, used = rng.permutation(nb - 1), 0
    for s, n in enumerate(lens):
        tables[s, :-(-n // bs)] = perm[used:used + -(-n // bs)]
        used += -(-n // bs)
    seq_ids = np.array([s for s, _ in rows], np.int32)
    positions = np.array([p for _, p in rows], np.int32)
    dense = [(k_cache.reshape(-1, KV, hd)[np.concatenate([np.arange(b * bs, b * bs + bs) for b in tables[s, :-(-n // bs)]])],
              v_cache.reshape(-1, KV, hd)[np.concatenate([np.arange(b * bs, b * bs + bs) for b in tables[s, :-(-n // bs)]])])
             for s, n in enumerate(lens)]  # each sequence's KV, read before the poisoning
    for s in range(len(lens)):
        first_key = positions[seq_ids == s].min() - window + 1
        freed = tables[s, :max(first_key, 0) // bs]
        k_cache[freed], v_cache[freed] = np.nan, np.nan
    assert np.isnan(k_cache).any()
    q = rng.normal(size=(len(rows), H, hd)).astype(np.float32)
    sinks = rng.normal(size=H).astype(np.float32) if with_sinks else None
    out = np.asarray(kernels.paged_attention(q, k_cache, v_cache, positions, seq_ids, tables,
                                             np.int32(positions.max() // bs + 1), scale=hd ** -0.5,
                                             window=window, sinks=sinks, method=method))
    assert np.isfinite(out).all()
    for s in range(len(lens)):
        mask = seq_ids == s
        ref = dense_reference(q[mask].astype(np.float64), *(a.astype(np.float64) for a in dense[s]),
                              positions[mask], window, sinks)
        np.testing.assert_allclose(out[mask], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [None, 300])
@pytest.mark.parametrize("hd,bs,dtype", [(12, 16, "float32"), (32, 16, "float32"), (32, 5, "float32"),
                                         (64, 16, "float32"), (128, 16, "float32"), (64, 16, "bfloat16")])
def test_native_matches_dense_over_many_key_chunks(window, hd, bs, dtype):
    """Rows whose keys span several of the native kernel's key chunks (256 keys; the softmax is merged
    across chunks), a window starting inside a chunk, and rows whose keys end just before, on and just
    past a chunk's end: against the float64 dense reference, on fresh random inputs; every head size
    the kernel compiles apart (32, 64, 128) and one off the 8-lane path (12); bfloat16 inputs against
    the reference on the same bf16 values (the output rounded to bf16)."""
    assert native.available()
    rng = np.random.default_rng()
    H, KV, lens = 4, 2, [700, 513, 300]
    width = -(-max(lens) // bs)
    nb = sum(-(-n // bs) for n in lens) + 1
    def as_dtype(a):  # values the dtype holds (the reference reads the same ones)
        return np.asarray(jnp.asarray(a, dtype).astype(jnp.float32))
    k_cache, v_cache = (as_dtype(rng.normal(size=(nb, bs, KV, hd))) for _ in range(2))
    tables = np.full((len(lens), width), nb - 1, np.int32)
    perm, used = rng.permutation(nb - 1), 0
    for s, n in enumerate(lens):
        tables[s, :-(-n // bs)] = perm[used:used + -(-n // bs)]
        used += -(-n // bs)
    rows = [(0, 699), (0, 255), (0, 256), (0, 511), (0, 512), (1, 512), (1, 257), (2, 299), (2, 0)]
    seq_ids = np.array([s for s, _ in rows], np.int32)
    positions = np.array([p for _, p in rows], np.int32)
    q = as_dtype(rng.normal(size=(len(rows), H, hd)))
    out = kernels.paged_attention(*(jnp.asarray(a, dtype) for a in (q, k_cache, v_cache)), positions, seq_ids, tables,
                                  np.int32(width), scale=hd ** -0.5, window=window, method="native")
    assert out.dtype == jnp.dtype(dtype)
    out = np.asarray(out.astype(jnp.float32))
    tolerance = 1e-5 if dtype == "float32" else 1e-2  # bf16: the output's rounding
    for s, n in enumerate(lens):
        mask = seq_ids == s
        flat = np.concatenate([np.arange(b * bs, b * bs + bs) for b in tables[s, :-(-n // bs)]])
        ref = dense_reference(q[mask].astype(np.float64), k_cache.reshape(-1, KV, hd)[flat].astype(np.float64),
                              v_cache.reshape(-1, KV, hd)[flat].astype(np.float64), positions[mask], window)
        np.testing.assert_allclose(out[mask], ref, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("hd,bs", [(12, 16), (32, 5)])
def test_native_matches_rows_in_bfloat16_on_decode_batches(window, hd, bs):
    """The native CPU kernel (the default on CPU) against the jnp rows method on a decode batch of
    bf16 rows: many sequences, scattered tables, padding rows (position 0 of sequence 0) and a table
    entry past the pool (clamped by both); head sizes on the scalar path (12) and on the 8-lane
    vector path (32, unrolled at compile time), with a block size that is not a whole vector (5)."""
    assert native.available()
    rng = np.random.default_rng(3 + (window or 0))
    nb, H, KV, S, width = 400, 8, 2, 37, 9
    k_cache, v_cache = (jnp.asarray(rng.normal(size=(nb, bs, KV, hd)), jnp.bfloat16) for _ in range(2))
    tables = rng.permutation(nb)[:S * width].reshape(S, width).astype(np.int32)
    tables[5, 3] = nb + 4
    positions = np.concatenate([rng.integers(0, width * bs, S), np.zeros(3, int)]).astype(np.int32)
    seq_ids = np.concatenate([rng.permutation(S), np.zeros(3, int)]).astype(np.int32)
    q = jnp.asarray(rng.normal(size=(len(positions), H, hd)), jnp.bfloat16)
    args = (q, k_cache, v_cache, positions, seq_ids, tables, np.int32(positions.max() // bs + 1))
    default = kernels.paged_attention(*args, scale=hd ** -0.5, window=window)  # the CPU default: native
    rows = kernels.paged_attention(*args, scale=hd ** -0.5, window=window, method="rows")
    assert default.dtype == rows.dtype == jnp.bfloat16
    # both accumulate in float32 from the same bf16 inputs: apart by bf16 rounding of the output
    np.testing.assert_allclose(np.asarray(default, np.float32), np.asarray(rows, np.float32), rtol=1e-2, atol=1e-2)


def test_pallas_matches_rows_on_ragged_decode_batches():
    """The Pallas kernel (the GPU default; interpreted here) against the jnp rows method on fresh
    random decode batches of bf16 rows: ragged positions from the first block to the table's last,
    scattered tables of several widths, GQA groups not a power of two (padded in the kernel),
    padding rows (position 0 of sequence 0). (Windows and sinks: the tests above.)"""
    rng = np.random.default_rng()
    for H, KV, width in [(6, 2, 9), (8, 8, 5)]:
        bs, hd, S, window = 4, 16, 11, None
        nb = S * width + 3
        k_cache, v_cache = (jnp.asarray(rng.normal(size=(nb, bs, KV, hd)), jnp.bfloat16) for _ in range(2))
        tables = rng.permutation(nb)[:S * width].reshape(S, width).astype(np.int32)
        positions = np.concatenate([[0, width * bs - 1], rng.integers(0, width * bs, S - 2), [0, 0]]).astype(np.int32)
        seq_ids = np.concatenate([rng.permutation(S), [0, 0]]).astype(np.int32)
        q = jnp.asarray(rng.normal(size=(len(positions), H, hd)), jnp.bfloat16)
        args = (q, k_cache, v_cache, positions, seq_ids, tables, np.int32(positions.max() // bs + 1))
        pallas = kernels.paged_attention(*args, scale=hd ** -0.5, window=window, method="pallas")
        rows = kernels.paged_attention(*args, scale=hd ** -0.5, window=window, method="rows")
        assert pallas.dtype == rows.dtype == jnp.bfloat16
        # both accumulate in float32 from the same bf16 inputs: apart by bf16 rounding of the output
        np.testing.assert_allclose(np.asarray(pallas, np.float32), np.asarray(rows, np.float32), rtol=1e-2, atol=1e-2)


def test_pallas_is_the_gpu_default_only(monkeypatch):
    """The platform picks the method: the Pallas kernel on GPUs, never on CPU."""
    module = importlib.import_module("moejax.kernels.paged_attention")
    assert module._default_method(None) in ("native", "auto")
    monkeypatch.setattr(module.jax, "default_backend", lambda: "gpu")
    assert module._default_method(None) == module._default_method(np.zeros(4)) == "pallas"


def test_write_kv_drops_padding_slots():
    k = np.zeros((2, 4, 1, 2), np.float32)
    new = np.ones((3, 1, 2), np.float32)
    slots = np.array([1, 6, 8], np.int32)  # slot 8 is past the 8-slot cache: a padding row
    k2, v2 = kernels.write_kv(k, k, new, 2 * new, slots)
    flat = np.asarray(k2).reshape(8, 2)
    assert flat[[1, 6]].tolist() == [[1, 1], [1, 1]]
    assert flat.sum() == 4  # nothing else written
    assert np.asarray(v2).reshape(8, 2)[6].tolist() == [2, 2]
