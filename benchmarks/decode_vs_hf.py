"""Decode throughput: moejax `LLM.generate` vs HF transformers `generate`, same checkpoint, same prompts.

    make bench-decode            # or: .venv/bin/python benchmarks/decode_vs_hf.py [--hf-python PY]

The HF half runs in an interpreter that has torch + transformers (here the Python 3.11 venv of
`make fixtures`; on the GPU image the same one as moejax): it builds a Qwen3-MoE checkpoint with the
shapes of moejax's `tiny-qwen3-moe` preset (random weights), saves it, and times greedy generation of
BATCH prompts x NEW_TOKENS tokens for each batch size, with transformers' default experts implementation (`grouped_mm`)
and with its per-expert loop (`eager`, what transformers 4 did). moejax then loads that checkpoint,
generates the same, checks the tokens are identical, and times it. HF is timed after one warm-up run,
moejax after its first call (which compiles; a second identical call must compile nothing); each
side's time is the best of REPEATS runs. The ratio is what counts: absolute times on a shared 2-core CPU are noisy, and the
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

BATCHES, PROMPT_LEN, NEW_TOKENS, REPEATS = (1, 16, 64, 256), 32, 128, 3
HERE = Path(__file__).resolve().parent
CKPT = HERE / ".cache" / "tiny-qwen3-moe-hf"


def prompts(vocab: int, batch: int) -> list[list[int]]:
    return [[(97 * b + 31 * i + 7) % (vocab - 3) + 3 for i in range(PROMPT_LEN)] for b in range(batch)]


def best_seconds(run, warmups: int = 1) -> float:
    for _ in range(warmups):
        run()
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return min(times)


def hf_side(out_path: str, batches: list[int]) -> None:
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
    seconds, tokens = {}, {}
    for impl in ("grouped_mm", "eager"):
        model = Qwen3MoeForCausalLM.from_pretrained(CKPT, experts_implementation=impl).eval()
        for batch in batches:
            ids = torch.tensor(prompts(cfg.vocab_size, batch))
            kwargs = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                          eos_token_id=None, attention_mask=torch.ones_like(ids))
            with torch.no_grad():
                seconds[f"{impl}/{batch}"] = best_seconds(lambda: model.generate(ids, **kwargs))
                tokens[str(batch)] = model.generate(ids, **kwargs)[:, PROMPT_LEN:].tolist()
            print(f"HF {impl} batch {batch}: {seconds[f'{impl}/{batch}']:.2f} s", flush=True)
    json.dump({"seconds": seconds, "tokens": tokens, "torch": torch.__version__,
               "transformers": transformers.__version__, "threads": torch.get_num_threads()}, open(out_path, "w"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hf-python", default=str(HERE.parent / ".venv-fixtures" / "bin" / "python"),
                    help="interpreter with torch + transformers for the HF half")
    ap.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    ap.add_argument("--hf-side", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.hf_side:
        return hf_side(args.hf_side, args.batches)

    hf_json = HERE / ".cache" / "hf_decode.json"
    hf_json.parent.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]
    subprocess.run([args.hf_python, __file__, "--hf-side", str(hf_json), "--batches", *map(str, args.batches)],
                   check=True, env={**os.environ, "PYTHONPATH": ""})
    hf = json.loads(hf_json.read_text())

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
        seconds = best_seconds(lambda: llm.generate(batch_prompts, params), warmups=0)
        tokens = batch * NEW_TOKENS
        hf_default, hf_eager = hf["seconds"][f"grouped_mm/{batch}"], hf["seconds"][f"eager/{batch}"]
        rows.append({
            "batch": batch,
            "hf": {impl: {"seconds": t, "tokens_per_s": tokens / t} for impl, t in
                   (("grouped_mm", hf_default), ("eager", hf_eager))},
            "moejax": {"seconds": seconds, "tokens_per_s": tokens / seconds,
                       "iterations": llm.last_stats["iterations"], "first_call_compilations": first_compilations,
                       "second_call_compilations": second_compilations},
            "speedup_vs_hf_default": hf_default / seconds,
            "speedup_vs_hf_eager_experts": hf_eager / seconds,
            "greedy_tokens_identical": [o.token_ids for o in outs] == hf["tokens"][str(batch)],
        })
        r = rows[-1]
        print(f"batch {batch:4d}: HF {r['hf']['grouped_mm']['tokens_per_s']:8.1f} tok/s, moejax "
              f"{r['moejax']['tokens_per_s']:8.1f} tok/s: x{r['speedup_vs_hf_default']:.2f} vs HF default, "
              f"x{r['speedup_vs_hf_eager_experts']:.2f} vs HF eager experts; greedy identical: "
              f"{r['greedy_tokens_identical']}", flush=True)
    result = {
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores (no accelerator)",
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
        "prompt_len": PROMPT_LEN, "new_tokens": NEW_TOKENS, "repeats": REPEATS,
        "max_decode_steps": llm.engine.executor.max_decode_steps,
        "hf_versions": {"torch": hf["torch"], "transformers": hf["transformers"], "torch_threads": hf["threads"]},
        "batches": rows,
    }
    (HERE / "decode_vs_hf.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
