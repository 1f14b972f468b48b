"""Offline generation time by token budget (tokens per iteration): the same LLM.generate on engines
that differ only in token_budget, alternating one run each per round, best of REPEATS. Same checkpoint
and prompts as decode_vs_hf.py (run that first: it writes the checkpoint). Sets moejax/llm.py's
OFFLINE_TOKEN_BUDGET.

    .venv/bin/python benchmarks/offline_token_budget.py    # -> benchmarks/offline_token_budget.json
"""

from __future__ import annotations

import os
import time

from decode_vs_hf import CKPT, NEW_TOKENS, PROMPT_LEN, prompts, write_json

from moejax import LLM, SamplingParams

BATCHES, BUDGETS, REPEATS = (16, 64, 256), (512, 2048), 5


def main() -> None:
    params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    rows = []
    for batch in BATCHES:
        batch_prompts = prompts(512, batch)
        llms = {b: LLM(str(CKPT), max_model_len=PROMPT_LEN + NEW_TOKENS, max_num_seqs=batch, token_budget=b)
                for b in BUDGETS}
        outputs = {b: [o.token_ids for o in llm.generate(batch_prompts, params)] for b, llm in llms.items()}
        times = {b: [] for b in BUDGETS}
        iterations = {}
        for _ in range(REPEATS):
            for b, llm in llms.items():
                t0 = time.perf_counter()
                llm.generate(batch_prompts, params)
                times[b].append(time.perf_counter() - t0)
                iterations[b] = llm.last_stats["iterations"]
        best = {b: min(t) for b, t in times.items()}
        rows.append({"batch": batch, "seconds": {str(b): t for b, t in best.items()},
                     "round_seconds": {str(b): t for b, t in times.items()},
                     "iterations": {str(b): n for b, n in iterations.items()},
                     "time_ratio_2048_over_512": best[2048] / best[512],
                     "greedy_tokens_identical": outputs[512] == outputs[2048]})
        print(f"batch {batch:4d}: " + ", ".join(f"budget {b}: {best[b] * 1e3:.1f} ms ({iterations[b]} iterations)"
                                             for b in BUDGETS) + f"; ratio {rows[-1]['time_ratio_2048_over_512']:.3f}",
              flush=True)
    write_json(__file__, load_average_1min=os.getloadavg()[0], prompt_len=PROMPT_LEN, new_tokens=NEW_TOKENS,
               repeats=REPEATS, batches=rows)


if __name__ == "__main__":
    main()
