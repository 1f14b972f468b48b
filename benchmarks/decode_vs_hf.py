"""Decode throughput: moejax `LLM.generate` vs HF transformers `generate`, same checkpoint, same prompts.

    make bench-decode            # or: .venv/bin/python benchmarks/decode_vs_hf.py [--hf-python PY]

The HF half runs in an interpreter that has torch + transformers (here the Python 3.11 venv of
`make fixtures`; on the GPU image the same one as moejax): it builds a Qwen3-MoE checkpoint with the
shapes of moejax's `tiny-qwen3-moe` preset (random weights), saves it, and times greedy generation of
BATCH prompts x NEW_TOKENS tokens for each batch size, with transformers' default experts implementation (`grouped_mm`)
and with its per-expert loop (`eager`, what transformers 4 did). moejax then loads that checkpoint,
generates the same, checks the tokens are identical, and times it. HF is timed after one warm-up run,
moejax after its first call (which compiles; a second identical call must compile nothing); the two
sides alternate, one run each per round (the HF interpreter stays up, taking requests on stdin), and
each side's time is the best of REPEATS rounds. The ratio is what counts: absolute times on a shared 2-core CPU are noisy, and the
machine's load is recorded. Writes benchmarks/decode_vs_hf.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

BATCHES, PROMPT_LEN, NEW_TOKENS, REPEATS = (1, 16, 64, 256), 32, 128, 5
HERE = Path(__file__).resolve().parent
CKPT = HERE / ".cache" / "tiny-qwen3-moe-hf"


MACHINE = f"{platform.machine()} CPU, {os.cpu_count()} cores (no accelerator)"


def write_json(script: str, **result) -> None:
    """Writes result, this machine named first, as the JSON beside `script` (its name, .json)."""
    path = Path(script).with_suffix(".json")
    path.write_text(json.dumps({"machine": MACHINE, **result}, indent=1) + "\n")
    print(f"wrote {path}")


def prompts(vocab: int, batch: int) -> list[list[int]]:
    return [[(97 * b + 31 * i + 7) % (vocab - 3) + 3 for i in range(PROMPT_LEN)] for b in range(batch)]


def hf_side() -> None:
    """Build + save the checkpoint, then time transformers' generate on request (run under the torch
    interpreter): each stdin line "IMPL BATCH" -> one stdout JSON line {"seconds", "tokens"}."""
    import torch
    import transformers
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(vocab_size=512, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=32, num_experts=16, num_experts_per_tok=4,
                         moe_intermediate_size=64, intermediate_size=256, norm_topk_prob=True,
                         max_position_embeddings=2048, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    model = Qwen3MoeForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # well-conditioned random weights (HF's 0.02 init gives near-ties)
            p.normal_(0, 1.0 / max(1, p.shape[-1]) ** 0.5) if p.ndim > 1 else p.fill_(1.0)
    CKPT.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(CKPT)
    models = {impl: Qwen3MoeForCausalLM.from_pretrained(CKPT, experts_implementation=impl).eval()
              for impl in ("grouped_mm", "eager")}
    print(json.dumps({"torch": torch.__version__, "transformers": transformers.__version__,
                      "threads": torch.get_num_threads()}), flush=True)
    for line in sys.stdin:
        impl, batch = line.split()
        ids = torch.tensor(prompts(cfg.vocab_size, int(batch)))
        with torch.no_grad():
            t0 = time.perf_counter()
            out = models[impl].generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                                        eos_token_id=None, attention_mask=torch.ones_like(ids))
            seconds = time.perf_counter() - t0
        print(json.dumps({"seconds": seconds, "tokens": out[:, PROMPT_LEN:].tolist()}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hf-python", default=str(HERE.parent / ".venv-fixtures" / "bin" / "python"),
                    help="interpreter with torch + transformers for the HF half")
    ap.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    ap.add_argument("--hf-side", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.hf_side:
        return hf_side()

    load_before = os.getloadavg()[0]
    hf = subprocess.Popen([args.hf_python, __file__, "--hf-side"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          text=True, env={**os.environ, "PYTHONPATH": ""})
    hf_versions = json.loads(hf.stdout.readline())  # once the checkpoint is saved and loaded

    def hf_generate(impl: str, batch: int) -> dict:
        hf.stdin.write(f"{impl} {batch}\n")
        hf.stdin.flush()
        return json.loads(hf.stdout.readline())

    from moejax import LLM, SamplingParams
    from moejax.engine.compiles import count_compilations

    llm = LLM(str(CKPT), max_model_len=PROMPT_LEN + NEW_TOKENS, max_num_seqs=max(args.batches))
    params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    rows = []
    for batch in args.batches:
        batch_prompts = prompts(512, batch)
        with count_compilations() as compiled:
            outs = llm.generate(batch_prompts, params)
        first_compilations = compiled.count
        with count_compilations() as compiled:
            outs = llm.generate(batch_prompts, params)
        second_compilations = compiled.count  # what a user's identical second call pays (0 wanted)
        hf_tokens = {impl: hf_generate(impl, batch)["tokens"] for impl in ("grouped_mm", "eager")}  # warm-up runs
        times = {"grouped_mm": [], "eager": [], "moejax": []}
        for _ in range(REPEATS):  # interleaved: each round's times come from the same minute of the machine
            for impl in ("grouped_mm", "eager"):
                times[impl].append(hf_generate(impl, batch)["seconds"])
            t0 = time.perf_counter()
            llm.generate(batch_prompts, params)
            times["moejax"].append(time.perf_counter() - t0)
        hf_default, hf_eager, seconds = (min(times[k]) for k in ("grouped_mm", "eager", "moejax"))
        tokens = batch * NEW_TOKENS
        rows.append({
            "batch": batch,
            "hf": {impl: {"seconds": t, "tokens_per_s": tokens / t} for impl, t in
                   (("grouped_mm", hf_default), ("eager", hf_eager))},
            "moejax": {"seconds": seconds, "tokens_per_s": tokens / seconds,
                       "iterations": llm.last_stats["iterations"], "first_call_compilations": first_compilations,
                       "second_call_compilations": second_compilations},
            "round_seconds": times,  # every round's time per side: how much this machine moved meanwhile
            "speedup_vs_hf_default": hf_default / seconds,
            "speedup_vs_hf_eager_experts": hf_eager / seconds,
            # against each HF experts implementation: the two can differ from each other on a near-tie
            "greedy_tokens_identical": {impl: [o.token_ids for o in outs] == t for impl, t in hf_tokens.items()},
            "sequences_differing": {impl: sum(o.token_ids != r for o, r in zip(outs, t)) for impl, t in hf_tokens.items()},
            "hf_implementations_agree": hf_tokens["grouped_mm"] == hf_tokens["eager"],
        })
        r = rows[-1]
        print(f"batch {batch:4d}: HF {r['hf']['grouped_mm']['tokens_per_s']:8.1f} tok/s, moejax "
              f"{r['moejax']['tokens_per_s']:8.1f} tok/s: x{r['speedup_vs_hf_default']:.2f} vs HF default, "
              f"x{r['speedup_vs_hf_eager_experts']:.2f} vs HF eager experts; sequences differing from HF "
              f"default / eager: {r['sequences_differing']['grouped_mm']} / {r['sequences_differing']['eager']}",
              flush=True)
    hf.stdin.close()
    hf.wait()
    write_json(__file__, load_average_1min={"before": load_before, "after": os.getloadavg()[0]},
               prompt_len=PROMPT_LEN, new_tokens=NEW_TOKENS, repeats=REPEATS,
               max_decode_steps=llm.engine.executor.max_decode_steps,
               hf_versions={"torch": hf_versions["torch"], "transformers": hf_versions["transformers"],
                            "torch_threads": hf_versions["threads"]},
               batches=rows)


if __name__ == "__main__":
    main()
