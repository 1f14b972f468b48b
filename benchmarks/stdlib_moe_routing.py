"""Routing statistics of the trained `stdlib-moe` on held-out text, beside a random-weight twin.

    .venv/bin/python benchmarks/stdlib_moe_routing.py     # after train_stdlib_moe.py (~5 min on 2 cores)

Writes benchmarks/stdlib_moe_routing.json and renders benchmarks/stdlib_moe.md from it and from
benchmarks/train_stdlib_moe.json. Every expert id comes from a real moejax forward
(`moejax.models.reference.prompt_routing`, fp32 compute on the shipped bf16 weights) over sequences of
the held-out files the training recorded; the layer-to-layer predictor is fitted on the train files.

Per layer: distinct experts a window of n consecutive tokens activates (n = 1, 16, 64, 128), the load
skew (share of assignments taken by the busiest quarter of experts; entropy of the load over log E),
and how well layer l's experts predict layer l+1's (top-k hit rate of a static co-occurrence mapping
fitted on the train split, against predicting layer l+1's most popular experts). The same numbers for
a seeded random-weight model of the same shape show what training changed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import sys
import sysconfig
import time
from pathlib import Path

import jax
import numpy as np

from moejax.checkpoint import load_model
from moejax.models.model import build_model
from moejax.models.reference import prompt_routing

HERE = Path(__file__).resolve().parent
TRAINING_JSON = HERE / "train_stdlib_moe.json"
RESULTS_JSON = HERE / "stdlib_moe_routing.json"
REPORT_MD = HERE / "stdlib_moe.md"
SEQ_LEN = 512
NUM_SEQUENCES = 96  # per split: 49k tokens each
WINDOWS = (1, 16, 64, 128)
LAYER_GROUPS = {"near-input": (0, 1, 2), "middle": (3, 4), "near-output": (5, 6, 7)}
RANDOM_SEED = 0
PUBLISHED = {
    "layered_prefill": {
        "arxiv": "2510.08055",
        "title": "From Tokens to Layers: Redefining Stall-Free Scheduling for MoE Serving with Layered Prefill",
        "model": "Qwen3-30B-A3B", "num_experts": 128, "top_k": 8, "chunk_tokens": 128,
        "activated_fraction_per_layer": 0.86,
    },
    "layerscope": {
        "arxiv": "2509.23638",
        "title": "LayerScope: Predictive Cross-Layer Scheduling for Efficient Multi-Batch MoE Inference on "
                 "Legacy Servers (v1: PreScope: Unleashing the Power of Prefetching for Resource-Constrained "
                 "MoE Inference)",
        "finding": "expert activation statistics (routing correlation between layers, gating weights, hot "
                   "experts) differ by layer group: near-input, middle, near-output",
    },
}


def training_script():
    spec = importlib.util.spec_from_file_location("train_stdlib_moe", HERE / "train_stdlib_moe.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# --- data -------------------------------------------------------------------------------------------

def split_streams(train, tokenizer, heldout_names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) token streams of this interpreter's stdlib, split as the training recorded."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = train.stdlib_files(root)
    by_name = {f.as_posix(): f for f in files}
    missing = [n for n in heldout_names if n not in by_name]
    if missing:
        raise SystemExit(f"{root} lacks held-out files the model was trained without: {missing[:5]} "
                         f"({len(missing)} in all); run on the Python that trained it "
                         f"({json.loads(TRAINING_JSON.read_text())['data']['stdlib_dir']})")
    heldout = [by_name[n] for n in heldout_names]
    taken = set(heldout)
    texts = train.read_texts(root, files)
    return (train.token_stream(tokenizer, [texts[f] for f in files if f not in taken]),
            train.token_stream(tokenizer, [texts[f] for f in heldout]))


def sequences(stream: np.ndarray, count: int, seq_len: int = SEQ_LEN) -> np.ndarray:
    """`count` evenly spaced non-overlapping sequences of the stream: [count, seq_len]."""
    n = len(stream) // seq_len
    if n < count:
        raise SystemExit(f"only {n} sequences of {seq_len} tokens, {count} wanted")
    chunks = stream[:n * seq_len].reshape(n, seq_len)
    return chunks[np.linspace(0, n - 1, count).astype(int)]


def routing(model, seqs: np.ndarray) -> np.ndarray:
    """Expert ids of real forwards: [S, T, L, K]."""
    return np.stack([prompt_routing(model, s.tolist()) for s in seqs])


# --- statistics ---------------------------------------------------------------------------------------

def expert_sets(ids: np.ndarray, num_experts: int) -> np.ndarray:
    """ids [..., K] -> one-hot sets [..., E] (bool)."""
    sets = np.zeros((*ids.shape[:-1], num_experts), bool)
    np.put_along_axis(sets, ids, True, axis=-1)
    return sets


def distinct_experts(ids: np.ndarray, window: int, num_experts: int) -> np.ndarray:
    """Mean number of distinct experts per layer a window of `window` consecutive tokens activates
    (non-overlapping windows inside each sequence): [L]."""
    S, T, L, K = ids.shape
    windows = ids[:, :T // window * window].reshape(S, T // window, window, L, K)
    union = expert_sets(windows, num_experts).any(axis=2)  # [S, W, L, E]
    return union.sum(-1).mean(axis=(0, 1))


def uniform_distinct(window: int, num_experts: int, top_k: int) -> float:
    """Expected distinct experts of `window` tokens that each pick top_k experts uniformly at random."""
    return num_experts * (1 - (1 - top_k / num_experts) ** window)


def load_skew(ids: np.ndarray, num_experts: int) -> dict[str, np.ndarray]:
    """Per layer: share of assignments the busiest quarter of experts takes, and the load's entropy / log E."""
    L = ids.shape[2]
    load = np.stack([np.bincount(ids[:, :, l].reshape(-1), minlength=num_experts) for l in range(L)])
    share = load / load.sum(-1, keepdims=True)
    top_quarter = np.sort(share, axis=-1)[:, ::-1][:, :num_experts // 4].sum(-1)
    entropy = -np.sum(share * np.log(np.where(share > 0, share, 1)), -1) / np.log(num_experts)  # 0 log 0 = 0
    return {"top_quarter_share": top_quarter, "load_entropy": entropy}


def cooccurrence(ids: np.ndarray, num_experts: int) -> np.ndarray:
    """[L-1, E, E]: tokens that chose expert i in layer l and expert j in layer l+1."""
    sets = expert_sets(ids, num_experts).reshape(-1, ids.shape[2], num_experts).astype(np.float64)
    return np.einsum("tli,tlj->lij", sets[:, :-1], sets[:, 1:])


def hit_rate(scores: np.ndarray, actual: np.ndarray, top_k: int) -> float:
    """Mean |top_k(scores) ∩ actual| / top_k. scores [N, E] (ties broken by expert id), actual [N, K]."""
    predicted = np.argsort(-scores, axis=-1, kind="stable")[:, :top_k]
    num_experts = scores.shape[-1]
    hits = expert_sets(predicted, num_experts) & expert_sets(actual, num_experts)
    return float(hits.sum(-1).mean() / top_k)


def next_layer_predictability(train_ids: np.ndarray, test_ids: np.ndarray, num_experts: int) -> dict:
    """Per layer pair (l, l+1), on test tokens: hit rate of predicting l+1's experts as the top-k of
    sum over l's experts i of C[i, :] (C: co-occurrence counts on train tokens), and of predicting
    l+1's top-k most used experts on train tokens (no look at layer l)."""
    K, L = test_ids.shape[-1], test_ids.shape[2]
    C = cooccurrence(train_ids, num_experts)
    test = test_ids.reshape(-1, L, K)
    test_sets = expert_sets(test, num_experts).astype(np.float64)
    popular = expert_sets(train_ids, num_experts).reshape(-1, L, num_experts).sum(0)  # [L, E]
    mapped, by_popularity = [], []
    for l in range(L - 1):
        mapped.append(hit_rate(test_sets[:, l] @ C[l], test[:, l + 1], K))
        by_popularity.append(hit_rate(np.broadcast_to(popular[l + 1], (len(test), num_experts)), test[:, l + 1], K))
    return {"cooccurrence_hit_rate": np.array(mapped), "popularity_hit_rate": np.array(by_popularity)}


def statistics(train_ids: np.ndarray, heldout_ids: np.ndarray, num_experts: int) -> dict:
    per_layer = {f"distinct_experts_{n}": distinct_experts(heldout_ids, n, num_experts) for n in WINDOWS}
    per_layer |= load_skew(heldout_ids, num_experts)
    pairs = next_layer_predictability(train_ids, heldout_ids, num_experts)
    groups = {}
    for name, layers in LAYER_GROUPS.items():
        sources = [l for l in layers if l < heldout_ids.shape[2] - 1]  # pair (l, l+1) belongs to l's group
        groups[name] = {"layers": list(layers), **{k: float(v[list(layers)].mean()) for k, v in per_layer.items()},
                        **{k: float(v[sources].mean()) for k, v in pairs.items()}}
    overall = {k: float(v.mean()) for k, v in (per_layer | pairs).items()}
    return {"per_layer": {k: v.tolist() for k, v in per_layer.items()},
            "next_layer": {k: v.tolist() for k, v in pairs.items()}, "groups": groups, "overall": overall}


# --- report ---------------------------------------------------------------------------------------

def render_markdown(training: dict, result: dict) -> str:
    tr, final, data, model = training["training"], training["final"], training["data"], training["model"]
    E, K = result["num_experts"], result["top_k"]
    trained, twin = result["models"]["trained"], result["models"]["random_init"]
    paper = result["published"]["layered_prefill"]
    n_eq = result["paper_equivalent_window"]
    lines = [
        "# stdlib-moe: a small Qwen3-MoE trained on the Python standard library",
        "",
        "Seeded random weights route nothing like a trained model, so expert-offload predictors and "
        "layered-prefill traffic measured on them mean little. `stdlib-moe` (shipped in "
        "`moejax/assets/stdlib-moe/`, `load_model(\"stdlib-moe\")`) is trained on text every machine with "
        "Python has. Numbers below come from `benchmarks/train_stdlib_moe.json` "
        "(`.venv/bin/python benchmarks/train_stdlib_moe.py`) and `benchmarks/stdlib_moe_routing.json` "
        "(`.venv/bin/python benchmarks/stdlib_moe_routing.py`, which also writes this file).",
        "",
        "## Training",
        "",
        f"- **Model**: Qwen3-MoE layout, {model['num_layers']} layers, {model['num_experts']} experts top-"
        f"{model['top_k']} (renormalised), hidden {model['hidden_size']}, expert width "
        f"{model['moe_intermediate_size']}, {model['num_heads']} heads / {model['num_kv_heads']} KV heads of "
        f"{model['head_dim']}, per-head q/k RMSNorm, tied embeddings, RoPE theta {model['rope_theta']:,.0f}: "
        f"{model['num_params'] / 1e6:.2f} M parameters, {model['active_params_per_token'] / 1e6:.2f} M active per "
        f"token. Saved in bf16 as transformers 5.23 writes Qwen3-MoE "
        f"({training['checkpoint']['total_bytes'] / 1e6:.2f} MB with the tokenizer).",
        f"- **Data**: the `*.py` files of `{data['stdlib_dir']}` (Python {training['versions']['python']}), "
        f"sorted, without {', '.join(data['excluded_dirs'])} directories: {data['num_files']} files. "
        f"Held out: {data['num_files'] - data['train_files']} files, {data['heldout_tokens']} tokens "
        f"({data['split']}); train: {data['train_files']} files, {data['train_tokens']} tokens.",
        f"- **Tokenizer**: byte-level BPE trained on the train split, {training['tokenizer']['vocab_size']} "
        f"entries, `{training['tokenizer']['eos_pad_token']}` as EOS and padding; "
        f"{training['tokenizer']['bytes_per_token_heldout']:.2f} bytes per token on the held-out files.",
        f"- **Training**: {tr['optimizer']}, peak LR {tr['peak_lr']:g}, weight decay {tr['weight_decay']:g}, "
        f"load-balancing loss coefficient {tr['aux_loss_coef']:g}; {tr['steps']} steps of {tr['batch_size']} x "
        f"{tr['seq_len']} tokens ({tr['tokens_seen'] / 1e6:.2f} M tokens, {tr['train_epochs']:.2f} epochs), "
        f"seed {tr['seed']}. {tr['train_seconds'] / 60:.1f} min wall on {training['machine']} "
        f"({tr['train_cpu_seconds'] / 60:.1f} min of process CPU time; the machine was shared, 1-min load "
        f"average {training['load_average_1min_start']:.1f} at the start, {training['load_average_1min_end']:.1f} "
        f"at the end).",
        "",
        "| loss (nats / token) | value |",
        "|---|---|",
        f"| train (end of training, {final['train_loss_windows']} train windows) | {final['train_loss']:.3f} |",
        f"| held-out, fp32 weights ({final['heldout_windows']} windows) | {final['heldout_loss']:.3f} "
        f"(perplexity {final['heldout_perplexity']:.1f}) |",
        f"| held-out, shipped bf16 weights | {final['heldout_loss_bf16_weights']:.3f} |",
        f"| unigram baseline (train-split token frequencies, add-one) | {final['unigram_heldout_loss']:.3f} |",
        f"| uniform over the vocabulary, log V | {final['log_vocab']:.3f} |",
        "",
        "Loss curve (train: mean of the last steps; held-out: first "
        f"{tr['eval_windows']} held-out windows):",
        "",
        "| step | train | held-out | load-balancing loss | seconds |",
        "|---|---|---|---|---|",
    ]
    for point in training["loss_curve"]:
        if "heldout_loss" in point:
            lines.append(f"| {point['step']} | {point['train_loss']:.3f} | {point['heldout_loss']:.3f} | "
                         f"{point['load_balancing_loss']:.3f} | {point['seconds']:.0f} |")
    lines += [
        "",
        "## Routing on held-out text",
        "",
        f"{result['heldout_sequences']} held-out sequences of {result['seq_len']} tokens "
        f"({result['heldout_sequences'] * result['seq_len']} tokens), expert ids from real moejax forwards "
        f"({result['compute']}); the random-weight twin is the same config with seeded random weights (seed "
        f"{result['random_seed']}). Uniform: each token picks {K} of {E} experts at random.",
        "",
        "Distinct experts a window of n consecutive tokens activates per layer (mean over layers; fraction "
        f"of {E}):",
        "",
        "| n | trained | random-weight twin | uniform |",
        "|---|---|---|---|",
    ]
    for n in WINDOWS:
        a, b = trained["overall"][f"distinct_experts_{n}"], twin["overall"][f"distinct_experts_{n}"]
        u = result["uniform_distinct_experts"][str(n)]
        lines.append(f"| {n} | {a:.1f} ({a / E:.0%}) | {b:.1f} ({b / E:.0%}) | {u:.1f} ({u / E:.0%}) |")
    lines += [
        "",
        f"Paper figure (arXiv {paper['arxiv']}, *{paper['title']}*): a {paper['chunk_tokens']}-token chunk activates "
        f"~{paper['activated_fraction_per_layer']:.0%} of {paper['model']}'s {paper['num_experts']} experts per layer "
        f"(top-{paper['top_k']}), where uniform routing would activate "
        f"{result['uniform_paper_fraction']:.2%}. A {paper['chunk_tokens']}-token chunk there makes "
        f"{result['paper_assignments_per_expert']:.0f} assignments per expert; here n = "
        f"{n_eq} does: the trained model activates {trained['overall'][f'distinct_experts_{n_eq}'] / E:.0%} "
        f"(random-weight twin {twin['overall'][f'distinct_experts_{n_eq}'] / E:.0%}, uniform "
        f"{result['uniform_distinct_experts'][str(n_eq)] / E:.0%}).",
        "",
        "Per layer, trained model (distinct experts per window; load skew; layer l -> l+1 predictability, "
        "top-k hit rate on held-out tokens):",
        "",
        "| layer | n=16 | n=64 | n=128 | top-quarter share | load entropy | co-occurrence hit (l -> l+1) "
        "| popularity hit |",
        "|---|---|---|---|---|---|---|---|",
    ]
    pl, nl = trained["per_layer"], trained["next_layer"]
    for l in range(result["num_layers"]):
        pair = (f"{nl['cooccurrence_hit_rate'][l]:.3f} | {nl['popularity_hit_rate'][l]:.3f}"
                if l < result["num_layers"] - 1 else "— | —")
        lines.append(f"| {l} | {pl['distinct_experts_16'][l]:.1f} | {pl['distinct_experts_64'][l]:.1f} | "
                     f"{pl['distinct_experts_128'][l]:.1f} | {pl['top_quarter_share'][l]:.3f} | "
                     f"{pl['load_entropy'][l]:.3f} | {pair} |")
    lines += [
        "",
        f"By layer group (as arXiv {result['published']['layerscope']['arxiv']}, "
        f"*{result['published']['layerscope']['title']}*, groups them; it reports that "
        f"{result['published']['layerscope']['finding']}):",
        "",
        "| group | layers | model | n=16 | n=128 | top-quarter share | load entropy | co-occurrence hit "
        "| popularity hit |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in LAYER_GROUPS:
        for label, stats in (("trained", trained), ("random twin", twin)):
            g = stats["groups"][name]
            lines.append(f"| {name} | {', '.join(map(str, g['layers']))} | {label} | {g['distinct_experts_16']:.1f} | "
                         f"{g['distinct_experts_128']:.1f} | {g['top_quarter_share']:.3f} | {g['load_entropy']:.3f} | "
                         f"{g['cooccurrence_hit_rate']:.3f} | {g['popularity_hit_rate']:.3f} |")
    lines += [
        "",
        f"Random-guess hit rate: {K}/{E} = {result['random_guess_hit_rate']:.3f}. The co-occurrence predictor scores each expert j of "
        "layer l+1 by how often train tokens that chose the same layer-l experts chose j, and takes the top "
        f"{K}; the popularity predictor always guesses layer l+1's {K} most used experts on the train split.",
        "",
        "## What it shows",
        "",
        *summary(training, result),
        "",
    ]
    return "\n".join(lines)


def summary(training: dict, result: dict) -> list[str]:
    """The comparisons the tables support, worded from the numbers."""
    E = result["num_experts"]
    trained, twin = result["models"]["trained"], result["models"]["random_init"]
    groups = trained["groups"]
    by_hit = sorted(groups, key=lambda g: groups[g]["cooccurrence_hit_rate"])
    by_skew = sorted(groups, key=lambda g: groups[g]["top_quarter_share"])
    curve = [p for p in training["loss_curve"] if "heldout_loss" in p]
    local = "more" if trained["overall"]["distinct_experts_16"] < twin["overall"]["distinct_experts_16"] else "less"
    predictable = ("more" if trained["overall"]["cooccurrence_hit_rate"] > twin["overall"]["cooccurrence_hit_rate"]
                   else "less")
    return [
        f"- Training made routing {local} local: a 16-token window activates {trained['overall']['distinct_experts_16']:.1f} "
        f"of {E} experts per layer ({twin['overall']['distinct_experts_16']:.1f} with random weights, "
        f"{result['uniform_distinct_experts']['16']:.1f} uniform), a 128-token window "
        f"{trained['overall']['distinct_experts_128'] / E:.0%} "
        f"(random weights {twin['overall']['distinct_experts_128'] / E:.0%}, uniform "
        f"{result['uniform_distinct_experts']['128'] / E:.0%}).",
        f"- And {predictable} predictable across layers: the co-occurrence mapping from layer l's experts recovers "
        f"{trained['overall']['cooccurrence_hit_rate']:.3f} of layer l+1's (top-{result['top_k']} hit rate, mean over "
        f"layer pairs; random weights {twin['overall']['cooccurrence_hit_rate']:.3f}, "
        f"layer l+1's most popular experts {trained['overall']['popularity_hit_rate']:.3f}, a random guess "
        f"{result['random_guess_hit_rate']:.3f}).",
        f"- The load stays near balanced under the load-balancing loss (entropy {trained['overall']['load_entropy']:.3f} "
        f"of the maximum; the busiest quarter of experts takes {trained['overall']['top_quarter_share']:.3f} of the "
        f"assignments, {result['even_load_top_quarter_share']:.2f} if even).",
        f"- By layer group, the trained model's layer-to-layer hit rate runs from {groups[by_hit[0]]['cooccurrence_hit_rate']:.3f} "
        f"({by_hit[0]}) to {groups[by_hit[-1]]['cooccurrence_hit_rate']:.3f} ({by_hit[-1]}), its top-quarter share from "
        f"{groups[by_skew[0]]['top_quarter_share']:.3f} ({by_skew[0]}) to {groups[by_skew[-1]]['top_quarter_share']:.3f} "
        f"({by_skew[-1]}); arXiv {result['published']['layerscope']['arxiv']} reports group-wise differences in large "
        "models.",
        f"- Caveat: the model is small and was still improving when training stopped (held-out loss "
        f"{curve[-2]['heldout_loss']:.3f} at step {curve[-2]['step']}, {curve[-1]['heldout_loss']:.3f} at step "
        f"{curve[-1]['step']}); its routing is that of a trained model, not of Qwen3-30B-A3B.",
    ]


# --- the run --------------------------------------------------------------------------------------

def main() -> int:
    train = training_script()
    training = json.loads(TRAINING_JSON.read_text())
    start = time.perf_counter()
    model, tokenizer = load_model("stdlib-moe", dtype="float32")
    cfg = model.config
    train_stream, heldout_stream = split_streams(train, tokenizer, training["data"]["heldout_files"])
    train_seqs, heldout_seqs = sequences(train_stream, NUM_SEQUENCES), sequences(heldout_stream, NUM_SEQUENCES)
    twin = build_model(cfg, seed=RANDOM_SEED)
    models = {}
    for name, m in (("trained", model), ("random_init", twin)):
        print(f"routing {name} ...", flush=True)
        models[name] = statistics(routing(m, train_seqs), routing(m, heldout_seqs), cfg.num_experts)
    paper = PUBLISHED["layered_prefill"]
    equivalent = paper["chunk_tokens"] * paper["top_k"] * cfg.num_experts // (paper["num_experts"] * cfg.num_experts_per_tok)
    result = {
        "command": "python benchmarks/stdlib_moe_routing.py",
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores (no accelerator)",
        "versions": {"python": platform.python_version(), "jax": jax.__version__},
        "checkpoint_sha256": training["checkpoint"]["safetensors_sha256"],
        "compute": "fp32 on the shipped bf16 weights",
        "num_layers": cfg.num_layers, "num_experts": cfg.num_experts, "top_k": cfg.num_experts_per_tok,
        "seq_len": SEQ_LEN, "heldout_sequences": NUM_SEQUENCES, "train_sequences": NUM_SEQUENCES,
        "random_seed": RANDOM_SEED, "windows": list(WINDOWS), "layer_groups": {k: list(v) for k, v in LAYER_GROUPS.items()},
        "uniform_distinct_experts": {str(n): uniform_distinct(n, cfg.num_experts, cfg.num_experts_per_tok) for n in WINDOWS},
        "uniform_paper_fraction": uniform_distinct(paper["chunk_tokens"], paper["num_experts"], paper["top_k"])
        / paper["num_experts"],
        "paper_assignments_per_expert": paper["chunk_tokens"] * paper["top_k"] / paper["num_experts"],
        "paper_equivalent_window": equivalent,
        "random_guess_hit_rate": cfg.num_experts_per_tok / cfg.num_experts,
        "even_load_top_quarter_share": 0.25,
        "published": PUBLISHED,
        "models": models,
        "seconds": time.perf_counter() - start,
    }
    RESULTS_JSON.write_text(json.dumps(result, indent=2) + "\n")
    REPORT_MD.write_text(render_markdown(training, result))
    print(f"wrote {RESULTS_JSON} and {REPORT_MD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
