"""The reference MoE path (route -> permute -> grouped GEMM -> combine) against float64 numpy."""

import numpy as np
import pytest

from moejax import kernels


def numpy_moe(x, ids, weights, w_gate_up, w_down):
    out = np.zeros_like(x, dtype=np.float64)
    F = w_down.shape[1]
    for t in range(x.shape[0]):
        for e, w in zip(ids[t], weights[t]):
            if e >= w_gate_up.shape[0]:
                continue
            gu = x[t] @ w_gate_up[e]
            h = gu[:F] / (1 + np.exp(-gu[:F])) * gu[F:]
            out[t] += w * (h @ w_down[e])
    return out


@pytest.mark.parametrize("T,E,K", [(1, 4, 1), (13, 8, 2), (40, 16, 4)])
def test_moe_ffn_matches_numpy(T, E, K):
    rng = np.random.default_rng(T + E + K)
    D, F = 12, 10
    x = rng.normal(size=(T, D)).astype(np.float32)
    ids = np.stack([rng.choice(E, K, replace=False) for _ in range(T)]).astype(np.int32)
    ids[-1] = E  # a padding row: routed nowhere
    weights = rng.random((T, K)).astype(np.float32)
    w_gate_up = rng.normal(size=(E, D, 2 * F)).astype(np.float32)
    w_down = rng.normal(size=(E, F, D)).astype(np.float32)
    out, group_sizes = kernels.moe_ffn(x, ids, weights, w_gate_up, w_down, backend="reference")
    ref = numpy_moe(*(a.astype(np.float64) if a.dtype != np.int32 else a for a in (x, ids, weights, w_gate_up, w_down)))
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(group_sizes), np.bincount(ids[ids < E], minlength=E))
