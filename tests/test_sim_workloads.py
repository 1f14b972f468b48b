"""Workload generators: seeded, bounded, with the documented means, rates and burstiness."""

import numpy as np
import pytest

from moejax.sim.workloads import WORKLOADS, arrival_times, make_workload, prompt_token_ids


def lengths(workload):
    return (np.array([r.prompt_len for r in workload]), np.array([r.output_len for r in workload]),
            np.array([r.arrival_s for r in workload]))


def test_seeded_and_reproducible():
    a = make_workload("sharegpt", rate=4.0, num_requests=200, seed=7)
    assert a == make_workload("sharegpt", rate=4.0, num_requests=200, seed=7)
    assert a != make_workload("sharegpt", rate=4.0, num_requests=200, seed=8)
    assert len(a) == 200 and a[0].arrival_s == 0.0


@pytest.mark.parametrize("name, prompt_mean, output_mean, prompt_p50", [
    ("sharegpt", 300, 255, 180),
    ("arxiv", 7900, 230, 7059),  # Sarathi-Serve's arxiv_summarization: median ≈ 7K, p90 ≈ 13K
    ("longctx", 27000, 1024, np.exp(9.90)),  # PrfaaS: log-normal μ 9.90, σ 1, [128, 128K]: mean ≈ 27K
])
def test_length_statistics(name, prompt_mean, output_mean, prompt_p50):
    prompt, output, _ = lengths(make_workload(name, rate=1.0, num_requests=20000, seed=0))
    spec = WORKLOADS[name]
    assert prompt.mean() == pytest.approx(prompt_mean, rel=0.04)
    assert output.mean() == pytest.approx(output_mean, rel=0.04)
    assert np.median(prompt) == pytest.approx(prompt_p50, rel=0.04)
    assert spec.prompt.lo <= prompt.min() and prompt.max() <= spec.prompt.hi
    assert spec.output.lo <= output.min() and output.max() <= spec.output.hi
    assert np.percentile(prompt, 99) > 2.5 * np.median(prompt)  # heavy right tail
    if name == "arxiv":
        assert np.percentile(prompt, 90) == pytest.approx(12985, rel=0.05)


def test_max_model_len_bounds_every_request():
    workload = make_workload("longctx", rate=1.0, num_requests=3000, seed=1, max_model_len=40960)
    prompt, output, _ = lengths(workload)
    assert (prompt + output <= 40960).all() and (output == 1024).all() and prompt.min() >= 128
    with pytest.raises(ValueError, match="leaves no room"):
        make_workload("longctx", rate=1.0, num_requests=3, max_model_len=1000)


def test_arrivals_poisson_and_bursty():
    rng = np.random.default_rng(0)
    for cv in (1.0, 3.0):
        gaps = np.diff(arrival_times(rate=5.0, num_requests=40000, rng=rng, cv=cv))
        assert gaps.mean() == pytest.approx(0.2, rel=0.05)
        assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.08)
    assert (arrival_times(float("inf"), 5, rng) == 0).all()
    _, _, arrivals = lengths(make_workload("arxiv", rate=2.0, num_requests=2000, seed=3, cv=2.0))
    assert (np.diff(arrivals) >= 0).all() and 2000 / arrivals[-1] == pytest.approx(2.0, rel=0.15)
    with pytest.raises(ValueError, match="rate must be positive"):
        arrival_times(0.0, 3, rng)


def test_unknown_workload_lists_presets():
    with pytest.raises(ValueError, match="unknown workload 'chat'.*sharegpt, sharegpt4, arxiv, longctx"):
        make_workload("chat", rate=1.0, num_requests=1)


def test_prompt_token_ids_deterministic_and_in_vocab():
    workload = make_workload("sharegpt", rate=1.0, num_requests=20, seed=0)
    ids = prompt_token_ids(workload, vocab_size=512, seed=3, exclude=(0, 1))
    assert ids == prompt_token_ids(workload, vocab_size=512, seed=3, exclude=(0, 1))
    assert ids != prompt_token_ids(workload, vocab_size=512, seed=4, exclude=(0, 1))
    assert [len(p) for p in ids] == [r.prompt_len for r in workload]
    flat = np.concatenate(ids)
    assert flat.min() >= 2 and flat.max() < 512
    # a request's prompt does not depend on the others (seeded per index)
    assert prompt_token_ids(workload[:3], vocab_size=512, seed=3, exclude=(0, 1)) == ids[:3]
