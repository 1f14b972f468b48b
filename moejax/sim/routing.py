"""Routing models: how many of a layer's rows go to each expert when no real router runs.

The currency of the MoE papers is the number of *distinct* experts n tokens activate in a layer
(expert bytes ∝ distinct experts). Uniform top-k routing over E experts activates
E·(1 − (1 − k/E)^n) of them, ~100% of Qwen3-30B-A3B's 128 at n = 128 tokens; the layered-prefill paper
measures ~86%, because real routing is skewed per layer and local per sequence. The models here:

    uniform     every token picks k distinct experts uniformly
    zipf        per-layer expert popularity ∝ 1/rank^s, hot experts differ per layer
    correlated  zipf popularity × per-request affinity: a request's tokens prefer a subset of experts
    trace       replay of routing recorded from real runs (contiguous runs keep sequence locality)

uniform, zipf and correlated are Plackett–Luce models: a token of routing class c at layer l takes
the top-k of log w[l, c] + Gumbel noise (a softmax router's top-k over noisy logits). Sampling every
token costs O(tokens · E) per layer, too slow for 16K-token prefills × 48 layers × thousands of
iterations, so above EXACT_MAX_TOKENS rows a draw uses the per-expert inclusion probabilities π
instead (Rosén's approximation for successive sampling, π_e = 1 − exp(−w_e τ) with Σπ = k):
the probability that expert e gets no token is Π_c (1 − π_ce)^n_c, exact for independent tokens given
π, and an occupied expert's tokens beyond its first are Poisson while few, a rounded normal with the
binomial's spread once many. Measured against per-token sampling (tests/test_sim_routing.py,
n = 17..2048 tokens): the approximate draw overestimates the mean number of distinct experts by at
most 0.8% of E for E = 128, k = 8 (uniform: exact; Zipf exponents up to 1.5, correlated with
affinities up to 100) and 1.4% of E for E = 32, k = 4 (Rosén's π slightly favours cold experts, most
for small k; per expert it is within ~8% of the exact inclusion probability); counts keep their
mean (Σ ≈ n·k) and their variance within ~15%.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moejax.config import ModelConfig
from moejax.engine.plan import IterationPlan, RowSlice

# Rows at or below this count are routed token by token (exactly); above it, from π (see above).
EXACT_MAX_TOKENS = 16


@dataclass(frozen=True)
class Rows:
    """The rows passing one layer group, slice by slice: who they belong to and where they start.
    Positions let trace replay continue a request's recorded sequence across iterations."""

    request_ids: np.ndarray  # [S] int64
    starts: np.ndarray  # [S] int64: position of each slice's first token
    num_tokens: np.ndarray  # [S] int64

    @classmethod
    def of(cls, slices: Iterable[tuple[int, int] | tuple[int, int, int]]) -> "Rows":
        """From (request_id, num_tokens) or (request_id, num_tokens, start) tuples."""
        items = [(s[0], s[1], s[2] if len(s) > 2 else 0) for s in slices]
        rid, n, start = (np.array(col, np.int64) for col in zip(*items)) if items else \
            (np.zeros(0, np.int64),) * 3
        return cls(rid, start, n)

    @classmethod
    def from_slices(cls, slices: Sequence[RowSlice]) -> "Rows":
        S = len(slices)
        return cls(np.fromiter((s.request_id for s in slices), np.int64, S),
                   np.fromiter((s.start for s in slices), np.int64, S),
                   np.fromiter((s.num_tokens for s in slices), np.int64, S))

    @property
    def total(self) -> int:
        return int(self.num_tokens.sum())


def request_hash(request_ids: np.ndarray, seed: int) -> np.ndarray:
    """[S] uint64: SplitMix64 of (request id, seed), a stable per-request random number."""
    with np.errstate(over="ignore"):
        z = request_ids.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(seed % 2**64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def inclusion_probabilities(weights: np.ndarray, k: int) -> np.ndarray:
    """[..., E] probability that each expert is among a token's top-k under Plackett–Luce weights,
    by Rosén's approximation π = 1 − exp(−w τ), τ solving Σπ = k. f(τ) = Σπ − k is concave and
    increasing, and f(k) ≤ 0 for weights normalised to sum 1, so Newton from τ = k rises
    monotonically to the root."""
    w = weights / weights.sum(axis=-1, keepdims=True)
    tau = np.full(w.shape[:-1] + (1,), float(k))
    for _ in range(100):
        e = np.exp(-w * tau)
        f = (1.0 - e).sum(axis=-1, keepdims=True) - k
        if np.abs(f).max() < 1e-10:
            break
        tau -= f / (w * e).sum(axis=-1, keepdims=True)
    return 1.0 - np.exp(-w * tau)


class RoutingModel:
    """Draws tokens per expert, [E], for the rows that pass an MoE layer."""

    num_layers: int
    num_experts: int
    top_k: int

    def draw(self, layer: int, rows: Rows, rng: np.random.Generator) -> np.ndarray:
        """[E] int64 tokens per expert at `layer`."""
        return self.draw_layers(np.array([layer]), rows, rng)[0]

    def draw_layers(self, layers: np.ndarray, rows: Rows, rng: np.random.Generator) -> np.ndarray:
        """[len(layers), E] int64: independent draws for several layers the same rows pass."""
        raise NotImplementedError


class PlackettLuceRouting(RoutingModel):
    """Tokens of class c at layer l pick the top-k of log w[l, c] + Gumbel. Subclasses set the
    weights [L, C, E] and map rows to classes."""

    def __init__(self, weights: np.ndarray, top_k: int):
        self.num_layers, self.num_classes, self.num_experts = weights.shape
        self.top_k = top_k
        self.weights = weights  # [L, C, E]
        pi = inclusion_probabilities(weights, top_k)  # [L, C, E]
        self.inclusion = pi
        # n_c @ table[l] gives, per expert: log P(no token), mean tokens, variance of tokens.
        # float32 halves the bytes a draw streams (it is most of a draw's time); ample precision.
        log_none = np.log1p(-np.minimum(pi, 1 - 1e-7))
        self._table = np.concatenate([log_none, pi, pi * (1 - pi)], axis=-1).astype(np.float32)  # [L, C, 3E]

    def classes(self, rows: Rows) -> np.ndarray:
        """[S] routing class of each slice."""
        return np.zeros(len(rows.num_tokens), np.int64)

    def draw_layers(self, layers, rows, rng):
        layers = np.asarray(layers)
        if rows.total <= EXACT_MAX_TOKENS:
            return self._draw_exact(layers, rows, rng)
        return self._draw_approx(layers, rows, rng)

    def _draw_exact(self, layers, rows, rng):
        token_class = np.repeat(self.classes(rows), rows.num_tokens)  # [N]
        w = self.weights[layers[:, None], token_class[None, :]]  # [Lg, N, E]
        # top-k of log w + Gumbel == the k smallest Exp(1) / w (successive sampling)
        keys = rng.standard_exponential(w.shape) / w
        top = np.argpartition(keys, self.top_k - 1, axis=-1)[..., :self.top_k]  # [Lg, N, k]
        flat = top + (np.arange(len(layers)) * self.num_experts)[:, None, None]
        return np.bincount(flat.ravel(), minlength=len(layers) * self.num_experts) \
            .reshape(len(layers), self.num_experts).astype(np.int64)

    def _draw_approx(self, layers, rows, rng):
        E = self.num_experts
        n_class = np.bincount(self.classes(rows), weights=rows.num_tokens, minlength=self.num_classes)
        contiguous = len(layers) and (np.diff(layers) == 1).all()
        table = self._table[layers[0]:layers[-1] + 1] if contiguous else self._table[layers]  # a view if it can
        agg = (n_class.astype(np.float32) @ table).astype(np.float64)  # [Lg, 3E]
        p_none, mean, var = np.exp(agg[:, :E]), agg[:, E:2 * E], agg[:, 2 * E:]
        p_some = 1.0 - p_none
        occupied = rng.random(mean.shape) < p_some
        with np.errstate(divide="ignore", invalid="ignore"):  # p_some == 0 only where unoccupied
            cond_mean = np.where(occupied, mean / p_some, 1.0)
            cond_sd = np.sqrt(np.maximum((var + mean ** 2) / p_some - cond_mean ** 2, 0.0))
        # Tokens beyond an occupied expert's first: Poisson while few (keeps the mean where rounding
        # a normal would not), a rounded normal with the binomial's spread once many.
        extra_mean = np.maximum(cond_mean - 1.0, 0.0)
        few = extra_mean < 10.0
        extra = np.where(few, rng.poisson(np.where(few, extra_mean, 0.0)),
                         np.rint(extra_mean + np.where(few, 0.0, cond_sd) * rng.standard_normal(mean.shape)))
        return np.where(occupied, 1 + np.clip(extra, 0, rows.total - 1), 0).astype(np.int64)

    def expected_distinct(self, layer: int, num_tokens: int) -> float:
        """Mean distinct experts `num_tokens` tokens of one request activate at `layer` (from π, so
        the large-n draws' expectation), averaged over routing classes."""
        pi = self.inclusion[layer]  # [C, E]
        return float((1.0 - (1.0 - pi) ** num_tokens).sum(axis=-1).mean())


class UniformRouting(PlackettLuceRouting):
    """Each token picks k distinct experts uniformly at random."""

    def __init__(self, num_layers: int, num_experts: int, top_k: int):
        super().__init__(np.ones((num_layers, 1, num_experts)), top_k)


def _zipf_weights(rng: np.random.Generator, num_layers: int, num_experts: int, exponent: float):
    """[L, E] popularity ∝ 1/rank^s, ranks permuted per layer so each layer has its own hot experts."""
    ranks = np.argsort(rng.random((num_layers, num_experts)), axis=1)
    return (ranks + 1.0) ** -exponent


class ZipfRouting(PlackettLuceRouting):
    """Per-layer expert popularity ∝ 1/rank^exponent (exponent 0 is uniform)."""

    def __init__(self, num_layers: int, num_experts: int, top_k: int, exponent: float = 1.0,
                 seed: int = 0):
        rng = np.random.default_rng([seed, 1])
        super().__init__(_zipf_weights(rng, num_layers, num_experts, exponent)[:, None, :], top_k)
        self.exponent = exponent


class CorrelatedRouting(PlackettLuceRouting):
    """Per-layer Zipf popularity × per-request affinity: per-sequence locality.

    A request belongs to one of `num_topics` routing contexts (a hash of its id); at every layer a
    context prefers its own random subset of `topic_experts` experts, whose weights are multiplied
    by `affinity`. affinity = 1 is plain Zipf; larger values concentrate a sequence's tokens on its
    subset, so a prefill chunk activates fewer experts than the same number of decode tokens from
    different requests. Two requests share a context with probability 1/num_topics (more contexts
    approach fully request-specific subsets, at num_topics·L·E table entries).

    Defaults (exponent 0.5, a quarter of the experts per context, affinity 14): with Qwen3-30B-A3B's
    128 experts and top-8, a 128-token chunk of one request activates ~86% of a layer's experts, the
    layered-prefill paper's measurement (`fit_correlated` re-fits the affinity to other targets).
    """

    def __init__(self, num_layers: int, num_experts: int, top_k: int, exponent: float = 0.5,
                 topic_experts: int | None = None, affinity: float = 14.0, num_topics: int = 64,
                 seed: int = 0):
        rng = np.random.default_rng([seed, 2])
        topic_experts = max(top_k, num_experts // 4) if topic_experts is None else topic_experts
        if not 0 < topic_experts <= num_experts:
            raise ValueError(f"topic_experts must be in [1, {num_experts}], got {topic_experts}")
        popularity = _zipf_weights(rng, num_layers, num_experts, exponent)  # [L, E]
        in_topic = np.argsort(rng.random((num_layers, num_topics, num_experts)), axis=2) < topic_experts
        super().__init__(popularity[:, None, :] * np.where(in_topic, affinity, 1.0), top_k)
        self.seed, self.exponent, self.affinity = seed, exponent, affinity
        self.topic_experts, self.num_topics = topic_experts, num_topics

    def classes(self, rows: Rows) -> np.ndarray:
        return (request_hash(rows.request_ids, self.seed) % np.uint64(self.num_topics)).astype(np.int64)


def fit_correlated(num_layers: int, num_experts: int, top_k: int, target_fraction: float,
                   tokens: int = 128, **params) -> CorrelatedRouting:
    """A CorrelatedRouting whose `affinity` makes `tokens` tokens of one request activate
    `target_fraction` of a layer's experts on average (bisection on log affinity; other parameters
    as given). Raises if the target is out of reach of the other parameters."""
    def fraction(affinity: float, layers: int) -> float:
        m = CorrelatedRouting(layers, num_experts, top_k, affinity=affinity, **params)
        return np.mean([m.expected_distinct(i, tokens) for i in range(layers)]) / num_experts

    probe = min(num_layers, 8)
    lo, hi = 0.0, np.log(1e4)  # log affinity; the fraction falls as affinity rises
    if not fraction(np.exp(hi), probe) <= target_fraction <= fraction(1.0, probe):
        raise ValueError(f"target_fraction={target_fraction} is outside what affinity in [1, 1e4] "
                         f"reaches with {params or 'the default parameters'}")
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fraction(np.exp(mid), probe) > target_fraction else (lo, mid)
    return CorrelatedRouting(num_layers, num_experts, top_k, affinity=float(np.exp(lo)), **params)


class TraceRouting(RoutingModel):
    """Replay of recorded routing. A request replays one recorded sequence (chosen by a hash of its
    id), position p mapping to that sequence's token p mod its length, so a request's consecutive
    tokens are consecutive recorded tokens: per-sequence locality is kept, and a chunk or a layer
    group sees the experts the recorded tokens chose."""

    def __init__(self, expert_ids: np.ndarray, seq_lens: np.ndarray, num_experts: int, seed: int = 0):
        expert_ids = np.asarray(expert_ids)
        seq_lens = np.asarray(seq_lens, np.int64)
        if expert_ids.ndim != 3:
            raise ValueError(f"expert_ids must be [num_tokens, L, K], got shape {expert_ids.shape}")
        if seq_lens.sum() != expert_ids.shape[0] or (seq_lens <= 0).any():
            raise ValueError(f"seq_lens must be positive and sum to num_tokens={expert_ids.shape[0]}, "
                             f"got {seq_lens.sum()} over {len(seq_lens)} sequences")
        if expert_ids.max() >= num_experts:
            raise ValueError(f"expert id {expert_ids.max()} >= num_experts={num_experts}")
        _, self.num_layers, self.top_k = expert_ids.shape
        self.num_experts, self.seed = num_experts, seed
        self.expert_ids = np.ascontiguousarray(expert_ids.transpose(1, 0, 2))  # [L, T, K]; -1 = none
        self.seq_lens = seq_lens
        self.seq_offsets = np.cumsum(seq_lens) - seq_lens

    def token_index(self, rows: Rows) -> np.ndarray:
        """[N] recorded token replayed by each row."""
        seq = (request_hash(rows.request_ids, self.seed) % np.uint64(len(self.seq_lens))).astype(np.int64)
        first_row = np.cumsum(rows.num_tokens) - rows.num_tokens
        pos = np.repeat(rows.starts - first_row, rows.num_tokens) + np.arange(rows.total)
        lens = np.repeat(self.seq_lens[seq], rows.num_tokens)
        return np.repeat(self.seq_offsets[seq], rows.num_tokens) + pos % lens

    def draw_layers(self, layers, rows, rng):
        layers = np.asarray(layers)
        ids = self.expert_ids[layers[:, None], self.token_index(rows)[None, :]]  # [Lg, N, K]
        flat = ids + (np.arange(len(layers)) * self.num_experts)[:, None, None]
        return np.bincount(flat[ids >= 0], minlength=len(layers) * self.num_experts) \
            .reshape(len(layers), self.num_experts).astype(np.int64)


def save_trace(path: str | Path, expert_ids: np.ndarray, seq_lens: np.ndarray, num_experts: int) -> None:
    """Write a routing trace: expert_ids [num_tokens, L, K] (top-k ids per token and layer, -1 for
    layers without a router), seq_lens [S] (tokens of each recorded sequence, in order)."""
    np.savez_compressed(path, expert_ids=np.asarray(expert_ids, np.int16),
                        seq_lens=np.asarray(seq_lens, np.int64), num_experts=num_experts)


def load_trace(path: str | Path, seed: int = 0) -> TraceRouting:
    with np.load(path) as f:
        missing = {"expert_ids", "seq_lens", "num_experts"} - set(f.files)
        if missing:
            raise ValueError(f"{path}: not a routing trace (missing {', '.join(sorted(missing))})")
        return TraceRouting(f["expert_ids"], f["seq_lens"], int(f["num_experts"]), seed)


ROUTING_MODELS = ("uniform", "zipf", "correlated", "trace")


def make_routing(name: str, cfg: ModelConfig, seed: int = 0, **params) -> RoutingModel:
    """A routing model for `cfg`'s shape. params: zipf: exponent; correlated: exponent,
    topic_experts, affinity, num_topics; trace: path (required)."""
    L, E, k = cfg.num_layers, cfg.num_experts, cfg.num_experts_per_tok
    if E == 0:
        raise ValueError(f"{cfg.name} has no experts; a routing model needs an MoE model")
    if name == "uniform":
        return UniformRouting(L, E, k, **params)
    if name == "zipf":
        return ZipfRouting(L, E, k, seed=seed, **params)
    if name == "correlated":
        return CorrelatedRouting(L, E, k, seed=seed, **params)
    if name == "trace":
        if "path" not in params:
            raise ValueError("routing 'trace' needs path=<.npz written by save_trace>")
        trace = load_trace(params["path"], seed)
        if (trace.num_layers, trace.num_experts, trace.top_k) != (L, E, k):
            raise ValueError(f"{params['path']}: trace has L={trace.num_layers}, E={trace.num_experts}, "
                             f"K={trace.top_k}; {cfg.name} has L={L}, E={E}, K={k}")
        return trace
    raise ValueError(f"unknown routing model {name!r}; models: {', '.join(ROUTING_MODELS)}")


def plan_expert_tokens(cfg: ModelConfig, plan: IterationPlan, routing: RoutingModel,
                       rng: np.random.Generator) -> np.ndarray:
    """[L, E] tokens per expert for a plan: every MoE layer draws for the rows of the group that
    passes it (rows of dense layers and of layers no group runs stay 0)."""
    expert_tokens = np.zeros((cfg.num_layers, cfg.num_experts), np.int64)
    moe_layers = np.flatnonzero(cfg.moe_layers)
    for group in plan.groups:
        layers = moe_layers[(moe_layers >= group.layer_start) & (moe_layers < group.layer_end)]
        if len(layers):
            rows = Rows.from_slices([plan.slices[i] for i in group.slices])
            expert_tokens[layers] = routing.draw_layers(layers, rows, rng)
    return expert_tokens


def activation_curve(model: RoutingModel, layer: int, token_counts: Sequence[int], trials: int = 16,
                     seed: int = 0, batch: bool = False) -> np.ndarray:
    """[len(token_counts)] mean distinct experts activated at `layer` by n tokens, over `trials`
    draws: all n from one request (a prefill chunk), or with batch=True one token from each of n
    requests (a decode batch). Each trial uses fresh request ids, each request a random start
    position: trace replay then reads a chunk or a decode token from anywhere in a recorded sequence,
    not only its first tokens (Plackett–Luce models ignore positions)."""
    rng = np.random.default_rng(seed)
    positions = np.random.default_rng([seed, 1])  # separate, so the routing draws are as without it
    means = []
    for n in token_counts:
        distinct = []
        for t in range(trials):
            if batch:
                rows = Rows.of([(t * n + i, 1, p) for i, p in enumerate(positions.integers(0, 2**31, n))])
            else:
                rows = Rows.of([(t, n, positions.integers(0, 2**31))])
            distinct.append((model.draw(layer, rows, rng) > 0).sum())
        means.append(np.mean(distinct))
    return np.array(means)
