"""LayerScope's learned layer-ahead predictor (LLaPor, arXiv 2509.23638): one small network per MoE
layer m and distance d, reading layer m-d's router input (x + attention, PCA-projected) and the
experts layer m-d chose (multi-hot), and giving E logits: which experts layer m's rows will take.

    features = record_features(model, prompts)          # real forwards: router inputs + expert ids
    trained = train_predictor(model, features)           # PCA per layer, then each network with optax
    trained.save(directory)  /  TrainedPredictor.load(directory, model)   # orbax; checked against the model

Shapes follow the paper's: near-input and near-output layers (each an outer 3/8 of the depth) get a
shallow MLP, middle layers a deeper one with residual blocks, a gated residual block modulated by the
hidden state and Gaussian input noise in training. Loss: binary cross-entropy with each expert's
positives weighted by its inverse frequency (rare experts count as much as busy ones) + 0.3 x focal
loss (gamma 2), AdamW with a cosine schedule. A predictor is saved with a fingerprint of the model's
routers and refused for any other model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from moejax.models.model import Model

PREDICTOR_DIR = "offload_predictor"  # next to a checkpoint
META_FILE = "predictor.json"
FOCAL_WEIGHT, FOCAL_GAMMA = 0.3, 2.0


class PredictorError(ValueError):
    """A saved predictor that does not fit the model, or none where one is needed."""


@dataclass(frozen=True)
class PredictorShape:
    pca_dims: int | None = None  # projected hidden-state dims (None: min(256, hidden size); the paper: 256)
    hidden: tuple[int, int] = (128, 256)  # width at the ends, in the middle (the paper's)
    blocks: tuple[int, int] = (2, 3)  # linear blocks at the ends, residual blocks in the middle
    distances: tuple[int, ...] = (1, 2)  # predict layer m from layers m-1 and m-2
    dropout: float = 0.1
    input_noise: float = 0.1  # middle layers, training only (std of the standardised PCA features)


def layer_group(layer: int, num_layers: int) -> str:
    """near-input / middle / near-output: the outer 3/8 of the depth at each end (8 layers: 0-2, 3-4, 5-7)."""
    end = round(3 * num_layers / 8)
    return "near-input" if layer < end else "near-output" if layer >= num_layers - end else "middle"


class ExpertPredictor(nnx.Module):
    """[T, P + E] -> [T, E] logits. Middle: residual blocks and a gate from the hidden features."""

    def __init__(self, pca_dims: int, num_experts: int, shape: PredictorShape, middle: bool, rngs: nnx.Rngs):
        width = shape.hidden[middle]
        self.pca_dims, self.middle = pca_dims, middle
        self.dropout, self.noise = shape.dropout, shape.input_noise
        self.inp = nnx.Linear(pca_dims + num_experts, width, rngs=rngs)
        self.blocks = nnx.List([nnx.Linear(width, width, rngs=rngs) for _ in range(shape.blocks[middle])])
        self.gate = nnx.Linear(pca_dims, width, rngs=rngs) if middle else None
        self.gated = nnx.Linear(width, width, rngs=rngs) if middle else None
        self.out = nnx.Linear(width, num_experts, rngs=rngs)

    def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """key: training (dropout, and input noise in the middle layers); None: inference."""
        keys = iter(jax.random.split(key, len(self.blocks) + 2)) if key is not None else None

        def drop(h):
            if keys is None or not self.dropout:
                return h
            return jnp.where(jax.random.bernoulli(next(keys), 1 - self.dropout, h.shape), h / (1 - self.dropout), 0)

        if keys is not None and self.middle and self.noise:
            hidden = x[:, :self.pca_dims] + self.noise * jax.random.normal(next(keys), x[:, :self.pca_dims].shape)
            x = jnp.concatenate([hidden, x[:, self.pca_dims:]], axis=1)
        h = drop(jax.nn.gelu(self.inp(x)))
        for block in self.blocks:
            step = drop(jax.nn.gelu(block(h)))
            h = h + step if self.middle else step
        if self.gate is not None:  # the hidden state modulates one more residual block
            h = h + jax.nn.sigmoid(self.gate(x[:, :self.pca_dims])) * jax.nn.gelu(self.gated(h))
        return self.out(h)


# --- features ---------------------------------------------------------------------------------------

@dataclass
class Features:
    """Real routing of recorded prompts: router inputs h [N, L, D] fp32 and expert ids [N, L, K]
    (-1 in dense layers), prompts one after another (seq_lens [S])."""

    hidden: np.ndarray
    ids: np.ndarray
    seq_lens: np.ndarray

    @property
    def num_tokens(self) -> int:
        return len(self.ids)


def record_features(model: Model, prompts: list[list[int]]) -> Features:
    """Each prompt through `model` once (moejax.models.reference.prompt_routing)."""
    from moejax.models.reference import prompt_routing

    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("recording predictor features needs at least one prompt, each with a token")
    ids, hidden = zip(*(prompt_routing(model, list(map(int, p)), hidden=True) for p in prompts))
    return Features(np.concatenate(hidden), np.concatenate(ids).astype(np.int32),
                    np.array([len(p) for p in prompts], np.int64))


def multi_hot(ids, num_experts: int):
    """ids [..., K] (ids outside [0, E): none) -> [..., E] float32."""
    ids = jnp.where((ids >= 0) & (ids < num_experts), ids, num_experts)
    return jax.nn.one_hot(ids, num_experts + 1, dtype=jnp.float32).sum(-2)[..., :num_experts]


def model_fingerprint(model: Model) -> str:
    """sha256 of every router's weights: tells a model's predictor from one trained for another."""
    digest = hashlib.sha256()
    for i, state in enumerate(model.layer_states):
        if model.config.moe_layers[i]:
            digest.update(np.asarray(state["router"]["w"][...], np.float32).tobytes())
    return digest.hexdigest()


def pca(hidden: np.ndarray, dims: int, max_rows: int = 32768, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Whitening PCA of rows [N, D] -> (mean [D], projection [D, dims]): (h - mean) @ projection has
    unit variance per component (the top `dims` eigenvectors of the covariance)."""
    rows = hidden if len(hidden) <= max_rows else hidden[np.random.default_rng(seed).choice(len(hidden), max_rows,
                                                                                             replace=False)]
    mean = rows.mean(0, dtype=np.float64)
    centered = rows - mean
    variance, vectors = np.linalg.eigh(centered.T @ centered / len(rows))  # ascending
    top = slice(None, -dims - 1, -1)
    return mean.astype(np.float32), (vectors[:, top] / np.sqrt(np.maximum(variance[top], 1e-12))).astype(np.float32)


@partial(jax.jit, static_argnums=4)
def _inputs(mean, projection, h, ids, num_experts: int):
    """[T, P + E]: projected router inputs and the source layer's multi-hot experts."""
    return jnp.concatenate([(h.astype(jnp.float32) - mean) @ projection, multi_hot(ids, num_experts)], axis=-1)


def _row_logits(graphdef, state, mean, projection, h, ids):
    net = nnx.merge(graphdef, state)
    return net(_inputs(mean, projection, h, ids, net.out.out_features))


def _batch_prob(graphdef, state, mean, projection, h, ids, valid):
    """P(at least one valid row takes each expert) [E], rows independent: 1 - prod(1 - sigmoid)."""
    log_none = -jax.nn.softplus(_row_logits(graphdef, state, mean, projection, h, ids))  # log(1 - p) [T, E]
    return 1.0 - jnp.exp(jnp.where(valid[:, None], log_none, 0.0).sum(0))


_JITTED: dict = {}


def _jit(fn, graphdef):
    key = (fn, graphdef)
    if key not in _JITTED:
        _JITTED[key] = jax.jit(lambda *a: fn(graphdef, *a))
    return _JITTED[key]


class TrainedPredictor:
    """The networks of one model: nets[(target layer, distance)], PCA of each source layer, and what
    they were trained for (meta: model name and fingerprint, shapes, training summary)."""

    def __init__(self, meta: dict, pca_of: dict[int, tuple[np.ndarray, np.ndarray]],
                 nets: dict[tuple[int, int], ExpertPredictor]):
        self.meta, self.pca_of, self.nets = meta, pca_of, nets
        self.num_experts = meta["num_experts"]
        self._split = {key: nnx.split(net) for key, net in nets.items()}

    def row_logits(self, target: int, distance: int, h, ids) -> jax.Array:
        """Logits [T, E] of layer `target`'s experts for rows whose layer target-distance router input is h
        [T, D] and experts ids [T, K]."""
        graphdef, state = self._split[(target, distance)]
        return _jit(_row_logits, graphdef)(state, *self.pca_of[target - distance], h, ids)

    def batch_prob(self, target: int, distance: int, h, ids, valid) -> jax.Array:
        graphdef, state = self._split[(target, distance)]
        return _jit(_batch_prob, graphdef)(state, *self.pca_of[target - distance], h, ids, valid)

    # --- saving -----------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        import orbax.checkpoint as ocp

        directory = Path(directory).absolute()
        directory.mkdir(parents=True, exist_ok=True)
        (directory / META_FILE).write_text(json.dumps(self.meta, indent=1) + "\n")
        tree = {"pca": {str(l): {"mean": m, "projection": p} for l, (m, p) in self.pca_of.items()},
                "nets": {_net_name(k): nnx.to_pure_dict(nnx.state(net)) for k, net in self.nets.items()}}
        with ocp.StandardCheckpointer() as ckptr:  # stored in bf16, like the checkpoint it serves
            ckptr.save(directory / "params", jax.tree.map(lambda a: np.asarray(a, jnp.bfloat16), tree), force=True)
            ckptr.wait_until_finished()
        return directory

    @classmethod
    def load(cls, directory: str | Path, model: Model) -> "TrainedPredictor":
        """The predictor saved in `directory`, refused unless it was trained for `model`."""
        import orbax.checkpoint as ocp

        directory = Path(directory).absolute()
        if not (directory / META_FILE).is_file():
            raise PredictorError(f"no trained expert predictor in {directory} (no {META_FILE}); train one with "
                                 f"`moejax offload train-predictor --model {model.config.name}`")
        meta = json.loads((directory / META_FILE).read_text())
        if meta["fingerprint"] != model_fingerprint(model):
            raise PredictorError(f"the expert predictor in {directory} was trained for model {meta['model']!r} "
                                 f"(router fingerprint {meta['fingerprint'][:12]}), not for {model.config.name!r} "
                                 f"(fingerprint {model_fingerprint(model)[:12]}): train one for this model")
        shape = PredictorShape(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["shape"].items()})
        nets = {key: _abstract_net(model, key[0], shape) for key in map(tuple, meta["nets"])}
        D = model.config.hidden_size
        abstract = {"pca": {str(l): {"mean": (D,), "projection": (D, shape.pca_dims)} for l in meta["pca_layers"]},
                    "nets": {_net_name(k): nnx.to_pure_dict(nnx.state(n)) for k, n in nets.items()}}
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(getattr(a, "shape", a), jnp.bfloat16), abstract,
                                is_leaf=lambda a: isinstance(a, tuple))
        with ocp.StandardCheckpointer() as ckptr:
            tree = jax.tree.map(lambda a: np.asarray(a, np.float32), ckptr.restore(directory / "params", abstract))
        for key, net in nets.items():
            state = nnx.state(net)
            nnx.replace_by_pure_dict(state, tree["nets"][_net_name(key)])
            nnx.update(net, state)
        pca_of = {int(l): (v["mean"], v["projection"]) for l, v in tree["pca"].items()}
        return cls(meta, pca_of, nets)


def _net_name(key: tuple[int, int]) -> str:
    return f"layer{key[0]}_from{key[0] - key[1]}"


def _net_args(model: Model, target: int, shape: PredictorShape) -> tuple:
    return shape.pca_dims, model.config.num_experts, shape, layer_group(target, model.config.num_layers) == "middle"


def _abstract_net(model: Model, target: int, shape: PredictorShape) -> ExpertPredictor:
    """Layer `target`'s network with shapes only (its values come from a checkpoint or an init)."""
    return nnx.eval_shape(lambda: ExpertPredictor(*_net_args(model, target, shape), nnx.Rngs(0)))


def _new_net(model: Model, target: int, shape: PredictorShape, seed: int) -> ExpertPredictor:
    """A freshly initialised network for layer `target` (initialised in one compiled program per shape)."""
    net = _abstract_net(model, target, shape)
    nnx.update(net, _init_state(*_net_args(model, target, shape), jax.random.key(seed * 1000 + target)))
    return net


@partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _init_state(pca_dims: int, num_experts: int, shape: PredictorShape, middle: bool, key) -> nnx.State:
    return nnx.state(ExpertPredictor(pca_dims, num_experts, shape, middle, nnx.Rngs(key)))


# --- training ---------------------------------------------------------------------------------------

def loss_fn(logits, labels, positive_weight):
    """Inverse-frequency-weighted BCE + FOCAL_WEIGHT x focal loss; positive_weight [E]."""
    weight = labels * positive_weight + (1.0 - labels)
    bce = (optax.sigmoid_binary_cross_entropy(logits, labels) * weight).mean()
    return bce + FOCAL_WEIGHT * optax.sigmoid_focal_loss(logits, labels, gamma=FOCAL_GAMMA).mean()


@partial(jax.jit, static_argnums=(0, 1))
def _train_step(graphdef, tx, params, opt_state, x, y, positive_weight, key, step):
    def loss(params):
        return loss_fn(nnx.merge(graphdef, params)(x, jax.random.fold_in(key, step)), y, positive_weight)

    value, grads = jax.value_and_grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value


def train_predictor(model: Model, features: Features, shape: PredictorShape = PredictorShape(), *, epochs: int = 10,
                    batch_size: int = 256, learning_rate: float = 2e-3, weight_decay: float = 1e-4, seed: int = 0,
                    log=None) -> TrainedPredictor:
    """PCA of every source layer's router inputs, then one network per (MoE layer m, distance d) trained
    on `features` to predict layer m's experts from layer m-d's."""
    cfg = model.config
    E, L = cfg.num_experts, cfg.num_layers
    if cfg.num_experts == 0:
        raise PredictorError(f"{cfg.name} is dense: it has no experts to predict")
    if features.hidden.shape[1:] != (L, cfg.hidden_size):
        raise PredictorError(f"features have router inputs {features.hidden.shape[1:]}; {cfg.name} has "
                             f"(layers, hidden) = {(L, cfg.hidden_size)}")
    if shape.pca_dims is None:
        shape = replace(shape, pca_dims=min(256, cfg.hidden_size))
    keys = [(m, d) for m in np.flatnonzero(cfg.moe_layers).tolist() for d in shape.distances if m - d >= 0]
    sources = sorted({m - d for m, d in keys})
    pca_of = {l: pca(features.hidden[:, l], shape.pca_dims, seed=seed) for l in sources}
    hidden, ids = features.hidden, features.ids
    rng = np.random.default_rng(seed)
    N = features.num_tokens
    steps = epochs * max(1, N // batch_size)
    tx = optax.adamw(optax.cosine_decay_schedule(learning_rate, steps, alpha=0.05), weight_decay=weight_decay)
    nets, losses = {}, {}
    for m, d in keys:
        x = np.asarray(_inputs(*pca_of[m - d], hidden[:, m - d], ids[:, m - d], E))
        y = np.asarray(multi_hot(ids[:, m], E))
        freq = np.maximum(y.mean(0), 1e-4)
        positive_weight = jnp.asarray(freq.mean() / freq, jnp.float32)
        net = _new_net(model, m, shape, seed)
        graphdef, params = nnx.split(net)
        opt_state = tx.init(params)
        key = jax.random.key(seed * 1000 + m * 10 + d)
        for step in range(steps):
            batch = rng.choice(N, min(batch_size, N), replace=False)
            params, opt_state, loss = _train_step(graphdef, tx, params, opt_state, x[batch], y[batch],
                                                  positive_weight, key, np.int32(step))
        nnx.update(net, params)
        losses[_net_name((m, d))] = float(loss)
        nets[(m, d)] = net
        if log:
            log(f"layer {m} from layer {m - d}: final training loss {float(loss):.4f}")
    meta = {"model": cfg.name, "fingerprint": model_fingerprint(model), "num_layers": L, "num_experts": E,
            "hidden_size": cfg.hidden_size, "top_k": cfg.num_experts_per_tok, "shape": asdict(shape),
            "nets": [list(k) for k in keys], "pca_layers": sources,
            "training": {"tokens": int(N), "sequences": len(features.seq_lens), "epochs": epochs,
                         "batch_size": batch_size, "steps_per_net": steps, "learning_rate": learning_rate,
                         "weight_decay": weight_decay, "seed": seed, "final_loss": losses}}
    return TrainedPredictor(meta, pca_of, nets)


def topk_recall(scores: np.ndarray, actual: np.ndarray, top_k: int) -> float:
    """Mean |top_k(scores) ∩ actual| / top_k over rows: scores [N, E], actual expert ids [N, K]."""
    predicted = np.argsort(-scores, axis=-1, kind="stable")[:, :top_k]
    hits = (predicted[:, :, None] == actual[:, None, :]).any(-1).sum(-1)
    return float(hits.mean() / top_k)


def text_sequences(tokenizer, paths: list[str | Path], *, glob: str = "*.py", skip_every: int = 0,
                   num_sequences: int = 64, seq_len: int = 512) -> list[list[int]]:
    """Prompts to record routing from: the files given (directories: their files matching `glob`, sorted),
    leaving out every `skip_every`-th file (a held-out split), encoded one after another and cut into
    `num_sequences` evenly spaced windows of `seq_len` tokens."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(p.rglob(glob), key=lambda f: f.as_posix())
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"--text {p}: no such file or directory")
    if skip_every:
        files = [f for i, f in enumerate(files, 1) if i % skip_every]
    ids = [t for f in files for t in tokenizer.encode(f.read_text(encoding="utf-8", errors="replace")).ids]
    n = len(ids) // seq_len
    if n == 0:
        raise ValueError(f"{len(files)} files hold {len(ids)} tokens: not one sequence of {seq_len}")
    starts = np.linspace(0, n - 1, min(num_sequences, n)).astype(int) * seq_len
    return [ids[s:s + seq_len] for s in starts]
