"""The native dense kernel (kernels.dense / row_sum / softmax on XLA:CPU: projections, router, LM head,
norms) against XLA's own dots and reductions, in the engine: the same LLM.generate on two engines whose
programs differ only in that (the XLA one traced inside kernels.for_gspmd(), as a sharded model's
are), alternating one run each per round, best of REPEATS. Also whether a request's logits depend on
the batch: prompt 0's last-position logits prefilled alone and among all the batch's prompts.
Same checkpoint and prompts as decode_vs_hf.py (run that first: it writes the checkpoint).

    .venv/bin/python benchmarks/native_dense.py    # -> benchmarks/native_dense.json
"""

from __future__ import annotations

import contextlib
import os
import time

import numpy as np
from decode_vs_hf import CKPT, NEW_TOKENS, PROMPT_LEN, prompts, write_json

from moejax import LLM, SamplingParams, kernels
from moejax.engine.metadata import attention_metadata, pad_tokens

BATCHES, REPEATS = (1, 16, 64, 256), 5
VARIANTS = {"xla": kernels.for_gspmd, "native": contextlib.nullcontext}


def last_logits(llm: LLM, token_lists: list[list[int]]) -> np.ndarray:
    """Each prompt's last-position logits from one prefill of all of them (the model's own programs)."""
    model = llm.engine.executor.model
    block_size, lengths = 16, [len(t) for t in token_lists]
    blocks = [-(-n // block_size) for n in lengths]
    tables = np.zeros((len(token_lists), max(blocks)), np.int32)
    first = np.cumsum([0, *blocks])
    for s, n in enumerate(blocks):
        tables[s, :n] = np.arange(first[s], first[s] + n)
    positions = np.concatenate([np.arange(n) for n in lengths])
    seq_ids = np.repeat(np.arange(len(token_lists)), lengths)
    kv = model.init_kv_cache(int(first[-1]), block_size)
    meta = attention_metadata(positions, seq_ids, tables, block_size, int(first[-1]))
    x, _ = model.run_layers(model.embed(pad_tokens(np.concatenate(token_lists), meta.positions.shape[0])), kv, meta)
    return np.asarray(model.logits(x))[np.cumsum(lengths) - 1]


def main() -> None:
    params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    rows = []
    for batch in BATCHES:
        batch_prompts = prompts(512, batch)
        llms, outputs, logits_alone, logits_among = {}, {}, {}, {}
        for name, context in VARIANTS.items():
            llm = llms[name] = LLM(str(CKPT), max_model_len=PROMPT_LEN + NEW_TOKENS, max_num_seqs=batch)
            with context():  # the programs trace at their first call
                outputs[name] = [o.token_ids for o in llm.generate(batch_prompts, params)]
                logits_alone[name] = last_logits(llm, batch_prompts[:1])[0]
                logits_among[name] = last_logits(llm, batch_prompts)[0]
        times = {name: [] for name in llms}
        for _ in range(REPEATS):
            for name, llm in llms.items():
                t0 = time.perf_counter()
                llm.generate(batch_prompts, params)
                times[name].append(time.perf_counter() - t0)
        best = {name: min(t) for name, t in times.items()}
        rows.append({
            "batch": batch, "seconds": best, "round_seconds": times,
            "time_ratio_native_over_xla": best["native"] / best["xla"],
            "greedy_tokens_identical": outputs["xla"] == outputs["native"],
            "prompt_0_logits_alone_vs_in_batch_max_abs_diff": {
                name: float(np.abs(logits_alone[name] - logits_among[name]).max()) for name in llms}})
        r = rows[-1]
        print(f"batch {batch:4d}: XLA {best['xla'] * 1e3:.1f} ms, native {best['native'] * 1e3:.1f} ms "
              f"(ratio {r['time_ratio_native_over_xla']:.3f}); greedy identical: {r['greedy_tokens_identical']}; "
              f"prompt 0's logits alone vs in the batch, max |diff|: "
              + ", ".join(f"{k} {v:.2e}" for k, v in r["prompt_0_logits_alone_vs_in_batch_max_abs_diff"].items()),
              flush=True)
    write_json(__file__, load_average_1min=os.getloadavg()[0], prompt_len=PROMPT_LEN, new_tokens=NEW_TOKENS,
               repeats=REPEATS, batches=rows)


if __name__ == "__main__":
    main()
