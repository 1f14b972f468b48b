"""Routing traces recorded from real forwards, and their activation curves.

    trace = record_trace(model, prompts, "trace.npz")     # real routing of each prompt token
    make_routing("trace", cfg, path="trace.npz")           # replay it in the simulator

`record_trace` runs each prompt through the model once (moejax.models.reference.prompt_routing: the
whole prompt in one forward, the same top-k the serving path takes) and keeps the experts every token
chose in every layer. `trace_activation_curve` measures, from the recorded ids themselves, how many
distinct experts n tokens activate in a layer: n consecutive tokens of one sequence (a prefill chunk)
or n tokens of different sequences (a decode batch) — the quantity routing models are calibrated to.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from moejax.sim.routing import TraceRouting, load_trace, save_trace


def record_trace(model, prompts: Sequence[Sequence[int]], path: str | Path, block_size: int = 16,
                 seed: int = 0) -> TraceRouting:
    """Route every prompt through `model` (a moejax Model), write the trace to `path` (save_trace's
    .npz: expert ids [tokens, L, K], -1 in dense layers; one sequence per prompt, in order) and return
    it loaded back as a TraceRouting (replay seed `seed`)."""
    from moejax.models.reference import prompt_routing

    cfg = model.config
    if cfg.num_experts == 0:
        raise ValueError(f"{cfg.name} has no experts: nothing to trace")
    prompts = [list(map(int, p)) for p in prompts]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("record_trace needs at least one prompt, each with at least one token")
    ids = np.concatenate([prompt_routing(model, p, block_size) for p in prompts], axis=0)
    save_trace(path, ids, np.array([len(p) for p in prompts], np.int64), cfg.num_experts)
    return load_trace(path, seed)


def trace_layer_counts(trace: TraceRouting, sequence: int) -> np.ndarray:
    """[L, E] tokens per expert of one recorded sequence in each layer (what the model's MoE layers
    report for that prompt's forward; zeros in dense layers)."""
    start, n = trace.seq_offsets[sequence], trace.seq_lens[sequence]
    ids = trace.expert_ids[:, start:start + n]  # [L, n, K]
    L, E = trace.num_layers, trace.num_experts
    flat = ids + (np.arange(L) * E)[:, None, None]
    return np.bincount(flat[ids >= 0], minlength=L * E).reshape(L, E)


def moe_layers(trace: TraceRouting) -> np.ndarray:
    """Layers with a router (their recorded ids are not -1)."""
    return np.flatnonzero((trace.expert_ids >= 0).any(axis=(1, 2)))


def trace_activation_curve(trace: TraceRouting, token_counts: Sequence[int], layers: Sequence[int] | None = None,
                           trials: int = 64, seed: int = 0, batch: bool = False) -> np.ndarray:
    """[len(token_counts)] mean distinct experts per layer (averaged over `layers`, default the MoE
    layers) that n recorded tokens activate, over `trials` draws per layer:

    batch=False: n consecutive tokens of one sequence, from a random sequence at least n long and a
                 random offset (a prefill chunk); NaN where no recorded sequence has n tokens.
    batch=True:  n tokens at random positions of distinct random sequences (a decode batch). With
                 fewer sequences than n, sequences repeat (each as rarely as possible), so beyond the
                 number of sequences the curve keeps some within-sequence locality a true decode
                 batch lacks: read it as a lower bound there.
    """
    rng = np.random.default_rng(seed)
    layers = moe_layers(trace) if layers is None else np.asarray(layers)
    S, lens, offs = len(trace.seq_lens), trace.seq_lens, trace.seq_offsets
    out = []
    for n in token_counts:
        n = int(n)
        if not batch:
            eligible = np.flatnonzero(lens >= n)
            if not len(eligible):
                out.append(np.nan)
                continue
        distinct = []
        for layer in layers:
            for _ in range(trials):
                if batch:
                    seqs = np.concatenate([rng.permutation(S) for _ in range(-(-n // S))])[:n]
                    tokens = offs[seqs] + rng.integers(0, lens[seqs])
                else:
                    s = rng.choice(eligible)
                    tokens = offs[s] + rng.integers(0, lens[s] - n + 1) + np.arange(n)
                ids = trace.expert_ids[layer, tokens]
                distinct.append(len(np.unique(ids[ids >= 0])))
        out.append(float(np.mean(distinct)))
    return np.array(out)
