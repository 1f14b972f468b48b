"""Decode throughput: moejax `LLM.generate` vs HF transformers `generate`, same checkpoint, same prompts.

    make bench-decode            # or: .venv/bin/python benchmarks/decode_vs_hf.py [--hf-python PY]

The HF half runs in an interpreter that has torch + transformers (here the Python 3.11 venv of
`make fixtures`; on the GPU image the same one as moejax): it builds a Qwen3-MoE checkpoint with the
shapes of moejax's `tiny-qwen3-moe` preset (random weights), saves it, and times greedy generation of
BATCH prompts x NEW_TOKENS tokens, with transformers' default experts implementation (`grouped_mm`)
and with its per-expert loop (`eager`, what transformers 4 did). moejax then loads that checkpoint,
generates the same, checks the tokens are identical, and times it. HF is timed after one warm-up run,
moejax after warm-up runs until one compiles nothing (steady state); each side's time is the best of
REPEATS runs. The ratio is what counts: absolute times on a shared 2-core CPU are noisy, and the
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

BATCH, PROMPT_LEN, NEW_TOKENS, REPEATS = 16, 32, 128, 3
HERE = Path(__file__).resolve().parent
CKPT = HERE / ".cache" / "tiny-qwen3-moe-hf"


def prompts(vocab: int) -> list[list[int]]:
    return [[(97 * b + 31 * i + 7) % (vocab - 3) + 3 for i in range(PROMPT_LEN)] for b in range(BATCH)]


def hf_side(out_path: str) -> None:
    """Build + save the checkpoint and time transformers' generate (run under the torch interpreter)."""
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE.parent]  # repo's kernels/ != HF's
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
    ids = torch.tensor(prompts(cfg.vocab_size))
    kwargs = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                  attention_mask=torch.ones_like(ids))
    seconds = {}
    for impl in ("grouped_mm", "eager"):
        model = Qwen3MoeForCausalLM.from_pretrained(CKPT, experts_implementation=impl).eval()
        with torch.no_grad():
            model.generate(ids, **kwargs)  # warm-up
            times = []
            for _ in range(REPEATS):
                t0 = time.perf_counter()
                out = model.generate(ids, **kwargs)
                times.append(time.perf_counter() - t0)
        seconds[impl] = min(times)
    json.dump({"seconds": seconds, "tokens": out[:, PROMPT_LEN:].tolist(), "torch": torch.__version__,
               "transformers": transformers.__version__, "threads": torch.get_num_threads()}, open(out_path, "w"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hf-python", default=str(HERE.parent / ".venv-fixtures" / "bin" / "python"),
                    help="interpreter with torch + transformers for the HF half")
    ap.add_argument("--hf-side", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.hf_side:
        return hf_side(args.hf_side)

    hf_json = HERE / ".cache" / "hf_decode.json"
    hf_json.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([args.hf_python, __file__, "--hf-side", str(hf_json)], check=True,
                   env={**os.environ, "PYTHONPATH": ""})
    hf = json.loads(hf_json.read_text())

    from moejax import LLM, SamplingParams
    from moejax.engine.compiles import count_compilations

    llm = LLM(str(CKPT), max_model_len=PROMPT_LEN + NEW_TOKENS, max_num_seqs=BATCH)
    params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    for _ in range(4):  # warm-up until a run compiles nothing
        with count_compilations() as compiled:
            outs = llm.generate(prompts(512), params)
        if not compiled.count:
            break
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        outs = llm.generate(prompts(512), params)
        times.append(time.perf_counter() - t0)
    seconds = min(times)
    identical = [o.token_ids for o in outs] == hf["tokens"]
    tokens = BATCH * NEW_TOKENS
    result = {
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores (no accelerator)",
        "load_average_1min": os.getloadavg()[0],
        "batch": BATCH, "prompt_len": PROMPT_LEN, "new_tokens": NEW_TOKENS,
        "hf": {impl: {"seconds": t, "tokens_per_s": tokens / t} for impl, t in hf["seconds"].items()},
        "hf_versions": {"torch": hf["torch"], "transformers": hf["transformers"], "torch_threads": hf["threads"]},
        "moejax": {"seconds": seconds, "tokens_per_s": tokens / seconds, "iterations": llm.last_stats["iterations"]},
        "speedup_vs_hf_default": hf["seconds"]["grouped_mm"] / seconds,
        "speedup_vs_hf_eager_experts": hf["seconds"]["eager"] / seconds,
        "greedy_tokens_identical": identical,
    }
    (HERE / "decode_vs_hf.json").write_text(json.dumps(result, indent=1))
    for impl, r in result["hf"].items():
        print(f"HF transformers ({impl} experts) {r['tokens_per_s']:8.1f} tok/s")
    print(f"moejax {result['moejax']['tokens_per_s']:8.1f} tok/s   x{result['speedup_vs_hf_default']:.2f} vs HF default, "
          f"x{result['speedup_vs_hf_eager_experts']:.2f} vs HF eager experts; greedy tokens identical: {identical}")


if __name__ == "__main__":
    main()
