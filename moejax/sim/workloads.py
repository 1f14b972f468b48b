"""Seeded request streams: arrival times and prompt/output lengths shaped like public traces.

Lengths are log-normal, truncated to [lo, hi] by redrawing (so no spike at the bounds):

    sharegpt  short chat. Prompt median 180 (σ 1.0, 4 .. 8K): mean ≈ 300; output median 165 (σ 1.0,
              1 .. 2K): mean ≈ 255; heavy right tails (p99 ≈ 1.8K and 1.4K tokens).
    sharegpt4 the openchat ShareGPT-4 trace Sarathi-Serve and the layered-prefill paper serve (longer,
              multi-turn contexts): prompt median 1730, p90 5696 (σ 0.93, 16 .. 32K); output median 415,
              p90 834 (σ 0.545, 1 .. 4K) — Sarathi-Serve's dataset table, as reported, not re-checked.
    arxiv     summarisation of papers, modelled on the arxiv_summarization trace Sarathi-Serve
              (OSDI'24) and the layered-prefill paper serve: prompt median ≈ 7.1K, p90 ≈ 13K
              tokens; output median ≈ 210, p90 ≈ 370 (Sarathi-Serve's dataset table, as reported;
              not re-checked against the PDF). Prompt σ 0.476 (256 .. 32K): mean ≈ 7.9K; output
              σ 0.451 (16 .. 2K): mean ≈ 230.
    longctx   PrfaaS (arXiv 2604.15039): prompts log-normal μ 9.90, σ 1.0 truncated to
              [128, 128K] (mean ≈ 27K; clipping instead would give ≈ 30K), 1,024 output tokens.

Arrivals: Poisson at `rate` requests/s, or bursty: gamma inter-arrival times with the same mean and
coefficient of variation `cv` (cv = 1 is Poisson; > 1 bursty). rate = inf: all arrive at 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class WorkloadRequest:
    arrival_s: float
    prompt_len: int
    output_len: int


@dataclass(frozen=True)
class LogNormal:
    """Token counts exp(N(mu, sigma)), rounded, truncated to [lo, hi]; sigma 0 is the constant exp(mu)."""

    mu: float
    sigma: float
    lo: int
    hi: int

    @classmethod
    def from_median(cls, median: float, sigma: float, lo: int, hi: int) -> "LogNormal":
        return cls(math.log(median), sigma, lo, hi)

    def sample(self, rng: np.random.Generator, hi: np.ndarray) -> np.ndarray:
        """[n] draws, each within [lo, hi[i]] (hi: [n] per-request upper bounds <= self.hi)."""
        out = np.zeros(len(hi), np.int64)
        todo = np.arange(len(hi))
        for _ in range(10_000):
            if not len(todo):
                return out
            x = np.rint(np.exp(rng.normal(self.mu, self.sigma, len(todo)))).astype(np.int64)
            ok = (x >= self.lo) & (x <= hi[todo])
            out[todo[ok]] = x[ok]
            todo = todo[~ok]
        raise ValueError(f"lengths in [{self.lo}, {hi.min()}] are too unlikely under {self}")


@dataclass(frozen=True)
class WorkloadSpec:
    prompt: LogNormal
    output: LogNormal


WORKLOADS: dict[str, WorkloadSpec] = {
    "sharegpt": WorkloadSpec(LogNormal.from_median(180, 1.0, 4, 8192),
                             LogNormal.from_median(165, 1.0, 1, 2048)),
    "sharegpt4": WorkloadSpec(LogNormal.from_median(1730, 0.93, 16, 32768),
                              LogNormal.from_median(415, 0.545, 1, 4096)),
    "arxiv": WorkloadSpec(LogNormal.from_median(7059, 0.476, 256, 32768),
                          LogNormal.from_median(208, 0.451, 16, 2048)),
    "longctx": WorkloadSpec(LogNormal(9.90, 1.0, 128, 131072), LogNormal.from_median(1024, 0.0, 1024, 1024)),
}


def arrival_times(rate: float, num_requests: int, rng: np.random.Generator, cv: float = 1.0) -> np.ndarray:
    """[n] seconds: cumulative gamma(shape 1/cv², mean 1/rate) gaps, the first request at 0."""
    if not rate > 0:
        raise ValueError(f"rate must be positive (requests per second; inf: all at once), got {rate}")
    if not cv > 0:
        raise ValueError(f"cv (the arrival gaps' coefficient of variation; 1 is Poisson) must be positive, got {cv}")
    if math.isinf(rate):
        return np.zeros(num_requests)
    shape = 1.0 / cv ** 2
    gaps = rng.gamma(shape, 1.0 / (rate * shape), num_requests)
    gaps[0] = 0.0
    return np.cumsum(gaps)


def make_workload(name: str, rate: float, num_requests: int, seed: int = 0,
                  max_model_len: int | None = None, cv: float = 1.0) -> list[WorkloadRequest]:
    """`num_requests` requests of preset `name` arriving at `rate` req/s (Poisson, or gamma with
    coefficient of variation cv). With max_model_len, outputs are drawn within
    max_model_len − prompt.lo and prompts within max_model_len − output (redrawn, not clipped)."""
    try:
        spec = WORKLOADS[name]
    except KeyError:
        raise ValueError(f"unknown workload {name!r}; workloads: {', '.join(WORKLOADS)}") from None
    if num_requests < 1:
        raise ValueError(f"num_requests must be >= 1, got {num_requests}")
    limit = max_model_len if max_model_len is not None else spec.prompt.hi + spec.output.hi
    if limit < spec.prompt.lo + spec.output.lo:
        raise ValueError(f"max_model_len={max_model_len} leaves no room for workload {name!r} "
                         f"(prompts >= {spec.prompt.lo}, outputs >= {spec.output.lo} tokens)")
    rng = np.random.default_rng(seed)
    arrivals = arrival_times(rate, num_requests, rng, cv)
    out_hi = np.full(num_requests, min(spec.output.hi, limit - spec.prompt.lo))
    try:
        output = spec.output.sample(rng, out_hi)
        prompt = spec.prompt.sample(rng, np.minimum(spec.prompt.hi, limit - output))
    except ValueError:  # the bound cuts off nearly all of the distribution
        typical = round(math.exp(spec.prompt.mu) + math.exp(spec.output.mu))
        raise ValueError(f"max_model_len={max_model_len} is too small for workload {name!r}: its prompts have a "
                         f"median of {math.exp(spec.prompt.mu):.0f} tokens and its outputs {math.exp(spec.output.mu):.0f}; "
                         f"give max_model_len >= {typical} or so") from None
    return [WorkloadRequest(float(a), int(p), int(o)) for a, p, o in zip(arrivals, prompt, output)]


def prompt_token_ids(workload: list[WorkloadRequest], vocab_size: int, seed: int = 0,
                     exclude: tuple[int, ...] = ()) -> list[list[int]]:
    """Deterministic prompts for real runs: request i gets prompt_len ids drawn uniformly from
    [0, vocab_size) minus `exclude` (e.g. EOS), from a generator seeded by (seed, i)."""
    allowed = np.setdiff1d(np.arange(vocab_size), np.asarray(exclude, np.int64))
    if not len(allowed):
        raise ValueError(f"no token ids left in vocab_size={vocab_size} after excluding {exclude}")
    return [allowed[np.random.default_rng([seed, i]).integers(len(allowed), size=r.prompt_len)].tolist()
            for i, r in enumerate(workload)]
