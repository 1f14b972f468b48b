"""Predictors: which experts the next layers' rows will need, guessed at layer l once its routing is
known. Each gives, per later MoE layer m, P[e] = probability that at least one row takes expert e at
layer m (the load scheduler weighs prefetches with it), and may say which cached experts are worth
keeping (eviction order; default least recently used).

    none        nothing: every miss is loaded on demand (LRU cache)
    lfru        frequency with recency (vLLM's expert cache, MoE-Infinity's activation statistics): P
                is an exponential moving average of "layer m needed e" over its passes; it also
                orders evictions
    gate-ahead  layer m's own router applied to layer l's router input (Pre-gated MoE, ProMoE
                without training): each row's top-k there is its vote, right with probability 1/2
                (`vote_probability`)
    learned     LayerScope's per-layer networks (moejax.offload.learned), trained on the model's
                real routing; P = 1 - prod over rows (1 - sigmoid(logit))

`row_scores` gives each row's scores [T, E] for layer m: what per-token top-k recall is measured on.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from moejax.models.model import Model
from moejax.models.moe import expert_counts
from moejax.offload.learned import TrainedPredictor

LFRU_DECAY = 0.9  # weight of the past in lfru's moving average (~10 passes of memory)


def targets(moe_layers: tuple[bool, ...], layer: int, lookahead: int) -> list[tuple[int, int]]:
    """[(target MoE layer m, distance m - layer)] for the next `lookahead` layers."""
    return [(m, m - layer) for m in range(layer + 1, min(layer + 1 + lookahead, len(moe_layers))) if moe_layers[m]]


class Predictor:
    """The no-prediction base: on-demand loads only, least recently used evicted first."""

    name = "none"

    def __init__(self, moe_layers: tuple[bool, ...], num_experts: int, lookahead: int = 2):
        self.moe_layers, self.num_experts, self.lookahead = moe_layers, num_experts, lookahead

    def predict(self, layer: int, h, ids, valid) -> dict[int, object]:
        """Later layer m -> P [E] (device or host arrays), from layer `layer`'s router input h [T, D],
        expert ids [T, K] and valid rows [T]."""
        return {}

    def observe(self, layer: int, needed: np.ndarray) -> None:
        """Layer `layer`'s pass needed these experts ([E] bool)."""

    def keep(self, layer: int) -> np.ndarray | None:
        """[E] worth of keeping each expert cached (None: least recently used first out)."""
        return None

    def row_scores(self, layer: int, target: int, h, ids) -> jax.Array:
        raise NotImplementedError(f"predictor {self.name!r} makes no per-row predictions")


class LFRU(Predictor):
    name = "lfru"

    def __init__(self, moe_layers, num_experts, lookahead=2, decay: float = LFRU_DECAY):
        super().__init__(moe_layers, num_experts, lookahead)
        self.decay = decay
        self.score = np.zeros((len(moe_layers), num_experts))  # [L, E] moving average of "needed"

    def predict(self, layer, h=None, ids=None, valid=None):
        return {m: self.score[m] for m, _ in targets(self.moe_layers, layer, self.lookahead)}

    def observe(self, layer, needed):
        self.score[layer] = self.decay * self.score[layer] + (1.0 - self.decay) * needed

    def keep(self, layer):
        return self.score[layer]


GATE_AHEAD_PRECISION = 0.5  # a vote of gate-ahead is taken to be right this often


def vote_probability(votes, rows, precision: float, top_k: int, num_experts: int):
    """P(some row needs the expert) [E] from each row's top-k guess: votes [E] of `rows` rows. A named
    expert is needed by its row with probability `precision`; the row's missed mass, (1 - precision) k,
    spreads over the E - k experts it did not name: P = 1 - (1 - precision)^votes (1 - eps)^(rows - votes)."""
    eps = (1.0 - precision) * top_k / max(num_experts - top_k, 1)
    return 1.0 - (1.0 - precision) ** votes * (1.0 - eps) ** (rows - votes)


@partial(jax.jit, static_argnums=(2, 3))
def _gate_ahead_prob(ids, valid, top_k: int, num_experts: int):
    votes = expert_counts(ids, num_experts).astype(jnp.float32)
    return vote_probability(votes, valid.sum(), GATE_AHEAD_PRECISION, top_k, num_experts)


class GateAhead(Predictor):
    name = "gate-ahead"

    def __init__(self, model: Model, lookahead=2):
        super().__init__(model.config.moe_layers, model.config.num_experts, lookahead)
        self.model = model

    def _ahead_ids(self, target: int, h, valid):
        return self.model.route(target, h, valid)[2]  # layer `target`'s router on these rows: ids [T, K]

    def predict(self, layer, h, ids, valid):
        k = self.model.config.num_experts_per_tok
        return {m: _gate_ahead_prob(self._ahead_ids(m, h, valid), valid, k, self.num_experts)
                for m, _ in targets(self.moe_layers, layer, self.lookahead)}

    def row_scores(self, layer, target, h, ids):
        valid = jnp.ones(h.shape[0], bool)
        _, weights, ahead = self.model.route(target, h, valid)
        return jnp.zeros((h.shape[0], self.num_experts)).at[jnp.arange(h.shape[0])[:, None], ahead].set(weights)


class Learned(Predictor):
    name = "learned"

    def __init__(self, model: Model, trained: TrainedPredictor, lookahead=2):
        super().__init__(model.config.moe_layers, model.config.num_experts, lookahead)
        self.trained = trained

    def predict(self, layer, h, ids, valid):
        return {m: self.trained.batch_prob(m, d, h, ids, valid)
                for m, d in targets(self.moe_layers, layer, self.lookahead) if (m, d) in self.trained.nets}

    def row_scores(self, layer, target, h, ids):
        return self.trained.row_logits(target, target - layer, h, ids)


def make_predictor(name: str, model: Model, lookahead: int = 2, trained: TrainedPredictor | None = None) -> Predictor:
    cfg = model.config
    if name == "none":
        return Predictor(cfg.moe_layers, cfg.num_experts, lookahead)
    if name == "lfru":
        return LFRU(cfg.moe_layers, cfg.num_experts, lookahead)
    if name == "gate-ahead":
        return GateAhead(model, lookahead)
    if name == "learned":
        if trained is None:
            raise ValueError("predictor 'learned' needs a trained predictor (moejax.offload.learned)")
        return Learned(model, trained, lookahead)
    raise ValueError(f"unknown predictor {name!r}; predictors: none, lfru, gate-ahead, learned")
