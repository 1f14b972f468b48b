"""Train `stdlib-moe`: a small Qwen3-MoE LM on the Python standard library's own source.

    .venv/bin/pip install -c constraints.txt -e '.[train]'
    .venv/bin/python benchmarks/train_stdlib_moe.py          # ~15 min on 2 CPU cores

Seeded random weights route nothing like a trained model; this one has learned routing, from text
every machine with Python has. Writes the HF checkpoint moejax/assets/stdlib-moe/ (bf16 safetensors,
byte-level BPE tokenizer; `load_model("stdlib-moe")`) and benchmarks/train_stdlib_moe.json (split,
loss curve, held-out loss against a unigram baseline, wall time, machine, versions).

The training forward below is plain JAX over a parameter dict (full-sequence causal attention, no KV
cache); tests/test_stdlib_moe.py holds moejax's forward equal to it on the saved weights.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors.numpy import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT_DIR = REPO / "moejax" / "assets" / "stdlib-moe"
RESULTS_JSON = Path(__file__).with_suffix(".json")

EOS = "<|endoftext|>"  # the only special token: end of file, and padding
EOS_ID = 0
HELDOUT_EVERY = 20  # every 20th file (sorted order) is held out
# Path components left out of the corpus: installed packages are not the standard library, and
# distributions often ship the test suites separately (Debian's libpython3-testsuite).
EXCLUDED_DIRS = ("site-packages", "dist-packages", "test", "tests", "idle_test")
EXCLUDED_PREFIX = "_sysconfigdata"  # generated per build: differs between machines
NUM_SNIPPETS = 6  # held-out text excerpts recorded for the tests and the reference fixture
SNIPPET_CHARS = 700
# The checkpoint format is the one transformers 5.23 writes (tensor names, config fields).
TRANSFORMERS_FORMAT = "5.23.0"


@dataclass(frozen=True)
class Shape:
    """The model: Qwen3-MoE layout (per-head q/k RMSNorm, renormalised top-k, tied embeddings)."""

    vocab_size: int = 4096
    hidden_size: int = 128
    num_layers: int = 8
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    num_experts: int = 32
    top_k: int = 4
    moe_intermediate_size: int = 64
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6
    max_position: int = 2048

    def num_params(self) -> int:
        return sum(int(np.prod(s)) for s in jax.tree.leaves(param_shapes(self), is_leaf=_is_shape))

    def active_params_per_token(self) -> int:
        expert = 3 * self.hidden_size * self.moe_intermediate_size
        return self.num_params() - self.num_layers * (self.num_experts - self.top_k) * expert

    def hf_config(self, router_aux_loss_coef: float) -> dict:
        """config.json with the fields (and spellings) transformers 5.23 writes for Qwen3-MoE."""
        return {
            "architectures": ["Qwen3MoeForCausalLM"],
            "attention_bias": False,
            "attention_dropout": 0.0,
            "bos_token_id": None,
            "decoder_sparse_step": 1,
            "dtype": "bfloat16",
            "eos_token_id": EOS_ID,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "initializer_range": INIT_STD,
            "intermediate_size": 4 * self.moe_intermediate_size,  # unused: every layer is sparse
            "max_position_embeddings": self.max_position,
            "mlp_only_layers": [],
            "model_type": "qwen3_moe",
            "moe_intermediate_size": self.moe_intermediate_size,
            "norm_topk_prob": True,
            "num_attention_heads": self.num_heads,
            "num_experts_per_tok": self.top_k,
            "num_hidden_layers": self.num_layers,
            "num_key_value_heads": self.num_kv_heads,
            "num_local_experts": self.num_experts,
            "output_router_logits": False,
            "pad_token_id": EOS_ID,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": {"rope_theta": self.rope_theta, "rope_type": "default"},
            "router_aux_loss_coef": router_aux_loss_coef,
            "sliding_window": None,
            "tie_word_embeddings": True,
            "transformers_version": TRANSFORMERS_FORMAT,
            "use_cache": True,
            "use_sliding_window": False,
            "vocab_size": self.vocab_size,
        }

    @classmethod
    def from_hf_config(cls, hf: dict) -> "Shape":
        return cls(vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
                   num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
                   num_kv_heads=hf["num_key_value_heads"], head_dim=hf["head_dim"],
                   num_experts=hf["num_local_experts"], top_k=hf["num_experts_per_tok"],
                   moe_intermediate_size=hf["moe_intermediate_size"],
                   rope_theta=hf["rope_parameters"]["rope_theta"], rms_norm_eps=hf["rms_norm_eps"],
                   max_position=hf["max_position_embeddings"])


@dataclass(frozen=True)
class Settings:
    seed: int = 0
    steps: int = 400
    batch_size: int = 16
    seq_len: int = 256
    peak_lr: float = 3e-3
    warmup_fraction: float = 0.1  # of the steps, linear from 0 to peak_lr
    final_lr_fraction: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    aux_loss_coef: float = 0.01  # Switch-style load balancing, per MoE layer
    log_every: int = 10
    eval_every: int = 50
    eval_windows: int = 32  # held-out windows of the loss curve (the final loss uses all of them)
    train_eval_windows: int = 128  # train windows of the final train loss


# --- corpus -----------------------------------------------------------------------------------------

def stdlib_files(root: Path) -> list[Path]:
    """The standard library's *.py files under `root`, sorted by relative path."""
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if set(rel.parts[:-1]) & set(EXCLUDED_DIRS) or rel.name.startswith(EXCLUDED_PREFIX):
            continue
        files.append(rel)
    return sorted(files, key=lambda p: p.as_posix())


def split_files(files: list[Path]) -> tuple[list[Path], list[Path]]:
    """(train, held-out): every HELDOUT_EVERY-th file is held out, so whole modules are unseen."""
    heldout = files[HELDOUT_EVERY - 1::HELDOUT_EVERY]
    taken = set(heldout)
    return [f for f in files if f not in taken], heldout


def read_texts(root: Path, files: list[Path]) -> dict[Path, str]:
    return {f: (root / f).read_text(encoding="utf-8", errors="replace") for f in files}


def corpus_digest(texts: dict[Path, str]) -> str:
    h = hashlib.sha256()
    for f, t in texts.items():
        h.update(f.as_posix().encode() + b"\0" + t.encode("utf-8", "surrogatepass") + b"\0")
    return h.hexdigest()


def heldout_snippets(texts: list[str], count: int = NUM_SNIPPETS) -> list[str]:
    """Excerpts of evenly spaced held-out files (of those long enough), from a line start a third into
    the file, whole lines."""
    long_enough = [t for t in texts if len(t) >= 3 * SNIPPET_CHARS]
    snippets = []
    for text in (long_enough[i] for i in np.linspace(0, len(long_enough) - 1, count).astype(int)):
        start = text.find("\n", len(text) // 3) + 1
        piece = text[start:start + SNIPPET_CHARS]
        snippets.append(piece[:piece.rfind("\n") + 1])
    return snippets


# --- tokenizer --------------------------------------------------------------------------------------

def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE (GPT-2 style pre-tokenisation) trained on `texts` in their given order."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    if tok.get_vocab_size() != vocab_size or tok.token_to_id(EOS) != EOS_ID:
        raise RuntimeError(f"tokenizer: got {tok.get_vocab_size()} entries (wanted {vocab_size}) "
                           f"and {EOS} = {tok.token_to_id(EOS)} (wanted {EOS_ID})")
    return tok


def token_stream(tokenizer, texts: list[str]) -> np.ndarray:
    """All texts encoded, each followed by EOS, concatenated: [N] int32."""
    parts = []
    for enc in tokenizer.encode_batch(texts):
        parts += [np.asarray(enc.ids, np.int32), np.asarray([EOS_ID], np.int32)]
    return np.concatenate(parts)


def windows(stream: np.ndarray, seq_len: int) -> np.ndarray:
    """Non-overlapping windows of seq_len + 1 tokens (inputs and shifted targets): [W, seq_len + 1]."""
    n = len(stream) // (seq_len + 1)
    return stream[:n * (seq_len + 1)].reshape(n, seq_len + 1)


def unigram_loss(train_stream: np.ndarray, targets: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of `targets` under the train split's add-one-smoothed unigram model."""
    counts = np.bincount(train_stream, minlength=vocab_size).astype(np.float64) + 1.0
    return float(-np.mean(np.log(counts[targets] / counts.sum())))


# --- the model: pure JAX over a parameter dict ----------------------------------------------------

INIT_STD = 0.02


def _is_shape(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


def param_shapes(s: Shape) -> dict:
    """Parameter shapes; layer parameters are stacked over layers (leading axis L), matrices [in, out]."""
    L, D, E, F, hd = s.num_layers, s.hidden_size, s.num_experts, s.moe_intermediate_size, s.head_dim
    return {
        "embed": (s.vocab_size, D),  # tied: also the LM head
        "final_norm": (D,),
        "layers": {
            "input_norm": (L, D), "post_attn_norm": (L, D),
            "w_q": (L, D, s.num_heads * hd), "w_k": (L, D, s.num_kv_heads * hd),
            "w_v": (L, D, s.num_kv_heads * hd), "w_o": (L, s.num_heads * hd, D),
            "q_norm": (L, hd), "k_norm": (L, hd),
            "w_router": (L, D, E),
            "w_gate": (L, E, D, F), "w_up": (L, E, D, F), "w_down": (L, E, F, D),
        },
    }


NORMS = ("final_norm", "input_norm", "post_attn_norm", "q_norm", "k_norm")


def init_params(s: Shape, seed: int) -> dict:
    """Norm weights 1, everything else N(0, INIT_STD^2) (HF's initializer_range)."""
    shapes = param_shapes(s)
    flat, treedef = jax.tree.flatten_with_path(shapes, is_leaf=_is_shape)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(flat))
    leaves = [jnp.ones(shape, jnp.float32) if path[-1].key in NORMS
              else INIT_STD * jax.random.normal(key, shape, jnp.float32)
              for (path, shape), key in zip(flat, keys)]
    return jax.tree.unflatten(treedef, leaves)


def decay_mask(params: dict) -> dict:
    """Weight decay on matrices only (not on norm weights)."""
    return jax.tree.map_with_path(lambda path, _: path[-1].key not in NORMS, params)


def rms_norm(x, weight, eps):
    return weight * (x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps))


def rope_tables(seq_len: int, s: Shape) -> tuple[jax.Array, jax.Array]:
    """cos, sin [T, head_dim] for HF's rotate-half convention."""
    inv_freq = 1.0 / (s.rope_theta ** (np.arange(0, s.head_dim, 2, dtype=np.float32) / s.head_dim))
    freqs = np.arange(seq_len, dtype=np.float32)[:, None] * inv_freq[None, :].astype(np.float32)
    emb = jnp.asarray(np.concatenate([freqs, freqs], axis=-1))
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x, cos, sin):
    """x: [B, T, heads, head_dim]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def attention(x, p, cos, sin, s: Shape):
    """Causal GQA over the full sequence with per-head q/k RMSNorm (Qwen3). x: [B, T, D]."""
    B, T, _ = x.shape
    q = rms_norm((x @ p["w_q"]).reshape(B, T, s.num_heads, s.head_dim), p["q_norm"], s.rms_norm_eps)
    k = rms_norm((x @ p["w_k"]).reshape(B, T, s.num_kv_heads, s.head_dim), p["k_norm"], s.rms_norm_eps)
    v = (x @ p["w_v"]).reshape(B, T, s.num_kv_heads, s.head_dim)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    group = s.num_heads // s.num_kv_heads
    q = q.reshape(B, T, s.num_kv_heads, group, s.head_dim)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k) * s.head_dim ** -0.5
    causal = jnp.tril(jnp.ones((T, T), bool))
    probs = jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(B, T, s.num_heads * s.head_dim)
    return out @ p["w_o"]


def route(x, w_router, top_k: int):
    """x: [N, D] -> (router probs [N, E], renormalised top-k weights [N, K], expert ids [N, K])."""
    probs = jax.nn.softmax(x @ w_router, axis=-1)
    weights, ids = jax.lax.top_k(probs, top_k)
    return probs, weights / jnp.sum(weights, axis=-1, keepdims=True), ids


def load_balancing_loss(probs, ids, num_experts: int):
    """Switch Transformer's auxiliary loss: E * sum_e (share of assignments to e) * (mean prob of e);
    1 when the load is uniform, E at full collapse onto one expert."""
    assigned = jnp.bincount(ids.reshape(-1), length=num_experts) / ids.size
    return num_experts * jnp.sum(assigned * jnp.mean(probs, axis=0))


def experts_blocked(x, weights, ids, w_gate, w_up, w_down, block_rows: int):
    """sum_k weights[n, k] * SwiGLU_{ids[n, k]}(x[n]) without computing unchosen experts or dropping
    any token: assignments are sorted by expert and each expert's group is padded to whole blocks of
    `block_rows`, so every block belongs to one expert (a batched matmul over blocks) and the row
    count has a static bound. x: [N, D], weights/ids: [N, K], w_gate/w_up: [E, D, F], w_down: [E, F, D]."""
    (N, D), K, E = x.shape, ids.shape[1], w_gate.shape[0]
    A = N * K
    rows = -(-(A + E * (block_rows - 1)) // block_rows) * block_rows
    flat = ids.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    sorted_expert = flat[order]
    counts = jnp.bincount(flat, length=E)
    padded = -(-counts // block_rows) * block_rows
    padded_end = jnp.cumsum(padded)
    rank = jnp.arange(A) - (jnp.cumsum(counts) - counts)[sorted_expert]
    row_of_sorted = (padded_end - padded)[sorted_expert] + rank
    row_of = jnp.zeros(A, jnp.int32).at[order].set(row_of_sorted.astype(jnp.int32))  # [A] in (n, k) order
    token_of_row = jnp.full(rows, N, jnp.int32).at[row_of].set(jnp.arange(A, dtype=jnp.int32) // K)
    xs = jnp.concatenate([x, jnp.zeros((1, D), x.dtype)])[token_of_row]  # padding rows read zeros
    xs = xs.reshape(rows // block_rows, block_rows, D)
    block_expert = jnp.minimum(jnp.searchsorted(padded_end, jnp.arange(rows // block_rows) * block_rows,
                                                side="right"), E - 1)
    h = jax.nn.silu(jnp.einsum("nbd,ndf->nbf", xs, w_gate[block_expert])) * \
        jnp.einsum("nbd,ndf->nbf", xs, w_up[block_expert])
    ys = jnp.einsum("nbf,nfd->nbd", h, w_down[block_expert]).reshape(rows, D)
    return jnp.einsum("nkd,nk->nd", ys[row_of].reshape(N, K, D), weights)


def forward(params: dict, tokens, s: Shape, block_rows: int = 128):
    """tokens [B, T] -> (logits [B, T, V] fp32, load-balancing loss per layer [L], expert ids [L, B*T, K])."""
    B, T = tokens.shape
    cos, sin = rope_tables(T, s)

    def layer(x, p):
        x = x + attention(rms_norm(x, p["input_norm"], s.rms_norm_eps), p, cos, sin, s)
        h = rms_norm(x, p["post_attn_norm"], s.rms_norm_eps).reshape(B * T, -1)
        probs, weights, ids = route(h, p["w_router"], s.top_k)
        out = experts_blocked(h, weights, ids, p["w_gate"], p["w_up"], p["w_down"], block_rows)
        return x + out.reshape(x.shape), (load_balancing_loss(probs, ids, s.num_experts), ids)

    x, (aux, ids) = jax.lax.scan(layer, params["embed"][tokens], params["layers"])
    logits = rms_norm(x, params["final_norm"], s.rms_norm_eps) @ params["embed"].T
    return logits, aux, ids


def token_nll(logits, targets):
    """Per-token negative log-likelihood (nats): logits [..., V], targets [...]."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def training_loss(params, batch, s: Shape, aux_coef: float):
    """batch [B, T + 1] -> (cross-entropy + aux_coef * mean load-balancing loss, (cross-entropy, aux))."""
    logits, aux, _ = forward(params, batch[:, :-1], s)
    ce = jnp.mean(token_nll(logits, batch[:, 1:]))
    return ce + aux_coef * jnp.mean(aux), (ce, jnp.mean(aux))


@partial(jax.jit, static_argnames="s")
def _window_nll(params, batch, s: Shape):
    return token_nll(forward(params, batch[:, :-1], s)[0], batch[:, 1:])


def mean_nll(params, batches: np.ndarray, s: Shape, batch_size: int) -> float:
    """Mean next-token loss over windows [W, T + 1], in batches (the last one padded, its padding dropped)."""
    total, count = 0.0, 0
    for i in range(0, len(batches), batch_size):
        chunk = batches[i:i + batch_size]
        padded = np.concatenate([chunk, np.zeros((batch_size - len(chunk), chunk.shape[1]), chunk.dtype)])
        nll = np.asarray(_window_nll(params, jnp.asarray(padded), s))[:len(chunk)]
        total, count = total + float(nll.astype(np.float64).sum()), count + nll.size
    return total / count


# --- training -------------------------------------------------------------------------------------

def make_optimizer(cfg: Settings, params: dict):
    import optax  # the `train` extra; the forward above needs only jax

    warmup = max(1, round(cfg.warmup_fraction * cfg.steps))
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.peak_lr, warmup, cfg.steps,
                                                  end_value=cfg.peak_lr * cfg.final_lr_fraction)
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                       optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=cfg.weight_decay,
                                   mask=decay_mask(params))), schedule


def batch_order(num_windows: int, steps: int, batch_size: int, seed: int) -> np.ndarray:
    """Window indices of every step [steps, batch]: seeded shuffles, one per pass over the data."""
    rng = np.random.default_rng(seed)
    passes = -(-steps * batch_size // num_windows)
    order = np.concatenate([rng.permutation(num_windows) for _ in range(passes)])
    return order[:steps * batch_size].reshape(steps, batch_size)


def train(params: dict, train_windows: np.ndarray, eval_windows: np.ndarray, s: Shape, cfg: Settings):
    """AdamW + warmup/cosine; -> (params, loss curve, timings: wall and process CPU seconds)."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    optimizer, schedule = make_optimizer(cfg, params)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, batch):
        (_, (ce, aux)), grads = jax.value_and_grad(training_loss, has_aux=True)(params, batch, s,
                                                                               cfg.aux_loss_coef)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return jax.tree.map(jnp.add, params, updates), opt_state, ce, aux

    order = batch_order(len(train_windows), cfg.steps, cfg.batch_size, cfg.seed)
    curve, recent = [], []
    columns = [TextColumn("training"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn(), TextColumn("loss {task.fields[loss]} aux {task.fields[aux]}")]
    start, cpu_start = time.perf_counter(), time.process_time()
    with Progress(*columns) as progress:
        task = progress.add_task("train", total=cfg.steps, loss="-", aux="-")
        for i in range(cfg.steps):
            params, opt_state, ce, aux = step(params, opt_state, jnp.asarray(train_windows[order[i]]))
            recent.append((float(ce), float(aux)))
            progress.update(task, advance=1, loss=f"{recent[-1][0]:.3f}", aux=f"{recent[-1][1]:.3f}")
            done = i + 1
            if done % cfg.log_every == 0 or done == cfg.steps:
                point = {"step": done, "train_loss": float(np.mean([c for c, _ in recent])),
                         "load_balancing_loss": float(np.mean([a for _, a in recent])),
                         "lr": float(schedule(i)), "seconds": round(time.perf_counter() - start, 1)}
                if done % cfg.eval_every == 0 or done == cfg.steps:
                    point["heldout_loss"] = mean_nll(params, eval_windows, s, cfg.batch_size)
                    progress.console.print(f"step {done}: train loss {point['train_loss']:.3f}, held-out "
                                           f"{point['heldout_loss']:.3f}, {point['seconds']:.0f} s")
                curve.append(point)
                recent = []
    return params, curve, {"train_seconds": time.perf_counter() - start,
                           "train_cpu_seconds": time.process_time() - cpu_start}


# --- the HF checkpoint ----------------------------------------------------------------------------

def hf_tensors(params: dict, s: Shape) -> dict[str, np.ndarray]:
    """fp32 params -> {HF tensor name: array} in transformers' layout (Linear weights [out, in],
    experts one module each, as Qwen3MoeForCausalLM.save_pretrained writes them)."""
    p = jax.tree.map(np.asarray, params)
    out = {"model.embed_tokens.weight": p["embed"], "model.norm.weight": p["final_norm"]}
    lp = p["layers"]
    for i in range(s.num_layers):
        pre = f"model.layers.{i}"
        out[f"{pre}.input_layernorm.weight"] = lp["input_norm"][i]
        out[f"{pre}.post_attention_layernorm.weight"] = lp["post_attn_norm"][i]
        for proj in "qkvo":
            out[f"{pre}.self_attn.{proj}_proj.weight"] = lp[f"w_{proj}"][i].T
        out[f"{pre}.self_attn.q_norm.weight"] = lp["q_norm"][i]
        out[f"{pre}.self_attn.k_norm.weight"] = lp["k_norm"][i]
        out[f"{pre}.mlp.gate.weight"] = lp["w_router"][i].T
        for e in range(s.num_experts):
            for proj in ("gate", "up", "down"):
                out[f"{pre}.mlp.experts.{e}.{proj}_proj.weight"] = lp[f"w_{proj}"][i, e].T
    return out


def params_from_hf(tensors: dict[str, np.ndarray], s: Shape) -> dict:
    """The inverse of hf_tensors, upcast to fp32."""
    t = {k: np.asarray(v, np.float32) for k, v in tensors.items()}
    layer = lambda i, name: t[f"model.layers.{i}.{name}"]  # noqa: E731
    L, E = range(s.num_layers), range(s.num_experts)
    stacked = {
        "input_norm": [layer(i, "input_layernorm.weight") for i in L],
        "post_attn_norm": [layer(i, "post_attention_layernorm.weight") for i in L],
        **{f"w_{p}": [layer(i, f"self_attn.{p}_proj.weight").T for i in L] for p in "qkvo"},
        "q_norm": [layer(i, "self_attn.q_norm.weight") for i in L],
        "k_norm": [layer(i, "self_attn.k_norm.weight") for i in L],
        "w_router": [layer(i, "mlp.gate.weight").T for i in L],
        **{f"w_{p}": [[layer(i, f"mlp.experts.{e}.{p}_proj.weight").T for e in E] for i in L]
           for p in ("gate", "up", "down")},
    }
    return {"embed": jnp.asarray(t["model.embed_tokens.weight"]), "final_norm": jnp.asarray(t["model.norm.weight"]),
            "layers": {k: jnp.asarray(np.array(v)) for k, v in stacked.items()}}


# A conversation as a Python module, what the model knows: the system message as its docstring, user
# messages as comments, assistant messages as code; the answer starts a function (`moejax serve`'s chat).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}\n"
    "{%- if message['role'] == 'system' -%}\n"
    "{{ '\"\"\"' + message['content'] + '\"\"\"\\n' }}\n"
    "{%- elif message['role'] == 'user' -%}\n"
    "{{ '# ' + message['content'] | replace('\\n', '\\n# ') + '\\n' }}\n"
    "{%- elif message['role'] == 'assistant' -%}\n"
    "{{ message['content'] + '\\n' }}\n"
    "{%- else -%}\n"
    "{{ raise_exception('stdlib-moe knows the roles system, user and assistant, not ' + message['role']) }}\n"
    "{%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "{{ 'def ' }}\n"
    "{%- endif -%}\n")


def save_checkpoint(params: dict, tokenizer, s: Shape, aux_coef: float, out_dir: Path) -> None:
    """config.json, model.safetensors (bf16), generation_config.json, tokenizer.json, tokenizer_config.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: np.ascontiguousarray(v.astype(ml_dtypes.bfloat16)) for k, v in hf_tensors(params, s).items()}
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    write_json(out_dir / "config.json", s.hf_config(aux_coef))
    write_json(out_dir / "generation_config.json", {
        "_from_model_config": True, "eos_token_id": EOS_ID, "output_attentions": False,
        "output_hidden_states": False, "pad_token_id": EOS_ID, "transformers_version": TRANSFORMERS_FORMAT,
        "use_cache": True})
    tokenizer.save(str(out_dir / "tokenizer.json"))
    write_json(out_dir / "tokenizer_config.json", {
        "backend": "tokenizers", "chat_template": CHAT_TEMPLATE, "eos_token": EOS, "model_max_length": s.max_position,
        "pad_token": EOS, "tokenizer_class": "TokenizersBackend"})


def load_checkpoint(directory: Path = CHECKPOINT_DIR) -> tuple[dict, Shape]:
    """(fp32 params of the saved bf16 weights, shape) of a checkpoint save_checkpoint wrote."""
    shape = Shape.from_hf_config(json.loads((directory / "config.json").read_text()))
    return params_from_hf(load_file(directory / "model.safetensors"), shape), shape


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- the run --------------------------------------------------------------------------------------

def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() \
        else platform.processor()
    return {"machine": f"{platform.machine()} CPU, {os.cpu_count()} cores (no accelerator)", "cpu": cpu,
            "load_average_1min_start": os.getloadavg()[0]}


def versions() -> dict:
    import optax
    import tokenizers

    return {"python": platform.python_version(), "jax": jax.__version__, "optax": optax.__version__,
            "tokenizers": tokenizers.__version__, "numpy": np.__version__}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=Settings.steps)
    parser.add_argument("--out", type=Path, default=CHECKPOINT_DIR, help="checkpoint directory")
    parser.add_argument("--json", type=Path, default=RESULTS_JSON)
    args = parser.parse_args(argv)
    cfg, shape = Settings(steps=args.steps), Shape()
    wall = time.perf_counter()
    info = {"command": "python benchmarks/train_stdlib_moe.py" + "".join(f" {a}" for a in (argv or sys.argv[1:])),
            **machine(), "versions": versions()}

    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_files(root)
    train_files, heldout_files = split_files(files)
    texts = read_texts(root, files)
    train_texts, heldout_texts = [texts[f] for f in train_files], [texts[f] for f in heldout_files]
    print(f"corpus: {root}: {len(train_files)} train files, {len(heldout_files)} held out", flush=True)

    t0 = time.perf_counter()
    tokenizer = train_tokenizer(train_texts, shape.vocab_size)
    tokenizer_seconds = time.perf_counter() - t0
    train_stream, heldout_stream = token_stream(tokenizer, train_texts), token_stream(tokenizer, heldout_texts)
    train_windows, heldout_windows = windows(train_stream, cfg.seq_len), windows(heldout_stream, cfg.seq_len)
    print(f"tokens: {len(train_stream)} train, {len(heldout_stream)} held out", flush=True)

    params, curve, timings = train(init_params(shape, cfg.seed), train_windows,
                                         heldout_windows[:cfg.eval_windows], shape, cfg)
    save_checkpoint(params, tokenizer, shape, cfg.aux_loss_coef, args.out)
    shipped, _ = load_checkpoint(args.out)

    # Held-out loss over every held-out window; train loss over evenly spaced windows the run trained on.
    seen_train = train_windows[np.unique(batch_order(len(train_windows), cfg.steps, cfg.batch_size, cfg.seed))]
    train_eval = seen_train[np.linspace(0, len(seen_train) - 1, cfg.train_eval_windows).astype(int)]
    heldout = mean_nll(params, heldout_windows, shape, cfg.batch_size)
    heldout_bf16 = mean_nll(shipped, heldout_windows, shape, cfg.batch_size)
    snippets = heldout_snippets(heldout_texts)
    sizes = {p.name: p.stat().st_size for p in sorted(args.out.iterdir())}
    info.update({
        "data": {
            "source": "the interpreter's standard library: sysconfig.get_paths()['stdlib'], *.py, sorted",
            "stdlib_dir": str(root), "excluded_dirs": list(EXCLUDED_DIRS),
            "excluded_prefix": EXCLUDED_PREFIX, "split": f"held out: every {HELDOUT_EVERY}th file (sorted order)",
            "num_files": len(files), "train_files": len(train_files),
            "train_bytes": sum(len(t.encode()) for t in train_texts),
            "heldout_bytes": sum(len(t.encode()) for t in heldout_texts),
            "train_tokens": int(len(train_stream)), "heldout_tokens": int(len(heldout_stream)),
            "corpus_sha256": corpus_digest(texts),
            "heldout_files": [f.as_posix() for f in heldout_files],
        },
        "tokenizer": {"kind": "byte-level BPE (tokenizers), trained on the train split", "vocab_size":
                      shape.vocab_size, "eos_pad_token": EOS, "eos_id": EOS_ID, "train_seconds": tokenizer_seconds,
                      "bytes_per_token_heldout": sum(len(t.encode()) for t in heldout_texts) / len(heldout_stream),
                      "sha256": file_digest(args.out / "tokenizer.json")},
        "model": {**asdict(shape), "architecture": "qwen3_moe", "tie_word_embeddings": True,
                  "num_params": shape.num_params(), "active_params_per_token": shape.active_params_per_token()},
        "training": {**asdict(cfg), "optimizer": "AdamW (b2 0.95) + warmup/cosine, global-norm clip, fp32",
                     "tokens_seen": cfg.steps * cfg.batch_size * cfg.seq_len,
                     "train_epochs": cfg.steps * cfg.batch_size / len(train_windows),
                     **timings, "seconds_per_step": timings["train_seconds"] / cfg.steps},
        "loss_curve": curve,
        "final": {
            "train_loss": mean_nll(params, train_eval, shape, cfg.batch_size),
            "train_loss_windows": len(train_eval),
            "heldout_loss": heldout, "heldout_perplexity": math.exp(heldout),
            "heldout_loss_bf16_weights": heldout_bf16, "heldout_windows": len(heldout_windows),
            "unigram_heldout_loss": unigram_loss(train_stream, heldout_windows[:, 1:].reshape(-1), shape.vocab_size),
            "log_vocab": math.log(shape.vocab_size),
        },
        "heldout_snippets": snippets,
        "checkpoint": {"dir": os.path.relpath(args.out, REPO), "files": sizes, "total_bytes": sum(sizes.values()),
                       "safetensors_sha256": file_digest(args.out / "model.safetensors")},
        "wall_seconds": time.perf_counter() - wall,
        "load_average_1min_end": os.getloadavg()[0],
    })
    write_json(args.json, info)
    f = info["final"]
    print(f"train loss {f['train_loss']:.3f}, held-out {heldout:.3f} (ppl {f['heldout_perplexity']:.1f}; "
          f"bf16 weights {heldout_bf16:.3f}), unigram {f['unigram_heldout_loss']:.3f}, log V {f['log_vocab']:.3f}; "
          f"{timings['train_seconds'] / 60:.1f} min training; checkpoint {info['checkpoint']['total_bytes'] / 1e6:.2f} MB "
          f"-> {args.out}, {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
