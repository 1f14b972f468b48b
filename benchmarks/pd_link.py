"""Prefill and decode processes over an emulated 1, 10 and 100 Gbps link: the router's split, the
bytes on the wire, transfer times, link utilisation; and the router watching the link vs a fixed
threshold on the slowest link. Greedy tokens are checked against one engine in every phase.

    .venv/bin/python benchmarks/pd_link.py            # -> benchmarks/pd_link.json (pd_link.md reads it)

Scale: tiny-qwen3-moe keeps 2 KiB of KV per token (4 layers, fp32) where Qwen3-30B-A3B keeps 96 KiB
(48 layers, 4 KV heads x 128, bf16), and this shared 2-core machine prefills far slower than a GPU;
link rates are scaled by LINK_SCALE so that a "1 Gbps" link is as much of a bottleneck for this
model here as the real one is there (the JSON records the bytes per second each link ran at).
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from moejax.engine import build
from moejax.engine.sampling import SamplingParams
from moejax.pd import LinkSpec, Router

MODEL = "tiny-qwen3-moe"
SIZES = dict(max_model_len=160, block_size=8, token_budget=128, num_blocks=256, max_num_seqs=8)
LINK_SCALE = 1e-4  # 1 Gbps -> 12.5 kB/s
LINKS_GBPS = (1, 10, 100)
THRESHOLD = 48  # prompts of at least this many uncached tokens are prefilled remotely
MAX_LINK_WAIT_S = 2.0
NUM_REQUESTS = 12
GAP_S = 0.5  # between arrivals
PARAMS = SamplingParams(max_tokens=8, ignore_eos=True)


def workload(seed: int) -> list[list[int]]:
    """Half short prompts (8-31 tokens, prefilled on the decode side), half long (64-128)."""
    rng = np.random.default_rng(seed)
    lengths = [int(rng.integers(8, 32)) if i % 2 else int(rng.integers(64, 129)) for i in range(NUM_REQUESTS)]
    return [rng.integers(0, 512, n).tolist() for n in lengths]


def reference(prompts: list[list[int]]) -> list[list[int]]:
    one = build(MODEL, **SIZES)
    reqs = [one.add_request(p, PARAMS) for p in prompts]
    while one.has_unfinished:
        one.step()
    return [r.output_token_ids for r in reqs]


def phase(router: Router, prompts: list[list[int]], want: list[list[int]]) -> dict:
    before = router.metrics([])["link"]
    ids = []
    for p in prompts:
        ids.append(router.submit(p, PARAMS))
        time.sleep(GAP_S)
    out = router.wait(ids, timeout=1800)
    time.sleep(0.5)  # the processes' last link reports
    m = router.metrics(ids)
    e2e = [q["e2e_s"] for q in m["requests"]]
    remote = [q for q in m["requests"] if q["kv_bytes"]]
    return {"routes": m["routes"], "offload_share": m["offload_share"],
            "identical_to_one_engine": [out[i] for i in ids] == want,
            "bytes_sent": m["link"]["bytes_sent"] - before["bytes_sent"],
            "bytes_received": m["link"]["bytes_received"] - before["bytes_received"],
            "kv_bytes_shipped": m["link"]["kv_bytes_shipped"],
            "kv_bytes_per_token": (sum(q["kv_bytes"] for q in remote) / sum(q["prompt_tokens"] for q in remote)
                                   if remote else None),
            "kv_bytes_before_handoff": sum(q["kv_bytes_before_handoff"] for q in remote),
            "transfer_s_mean": statistics.mean(q["transfer_s"] for q in remote) if remote else None,
            "link_utilisation": m["link"]["utilisation"], "window_s": m["window_s"],
            "e2e_mean_s": statistics.mean(e2e), "e2e_max_s": max(e2e), "requests": m["requests"]}


def main() -> None:
    prompts = workload(0)
    want = reference(prompts)
    out = {"machine": {"node": platform.node(), "processor": platform.processor(), "python": sys.version.split()[0]},
           "model": MODEL, "engine": SIZES, "link_scale": LINK_SCALE, "threshold": THRESHOLD,
           "max_link_wait_s": MAX_LINK_WAIT_S, "num_requests": NUM_REQUESTS, "gap_s": GAP_S,
           "max_tokens": PARAMS.max_tokens, "prompt_tokens": [len(p) for p in prompts], "phases": {}}
    with tempfile.TemporaryDirectory() as cache:
        env = {"JAX_COMPILATION_CACHE_DIR": cache, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
        for watch in (True, False):
            link = LinkSpec.emulated(LINKS_GBPS[-1], scale=LINK_SCALE, latency_s=0.001, connections=4)
            with Router(MODEL, threshold=THRESHOLD, link=link, engine_options=SIZES, worker_env=env,
                        max_link_wait_s=MAX_LINK_WAIT_S if watch else None) as router:
                for warm_threshold in (10**9, 0):  # every prompt prefilled locally, then remotely: compiles
                    router.threshold = warm_threshold
                    phase(router, prompts, want)
                router.threshold = THRESHOLD
                for gbps in LINKS_GBPS if watch else LINKS_GBPS[:1]:
                    router.set_link(LinkSpec.emulated(gbps, scale=LINK_SCALE, latency_s=0.001))
                    name = f"{gbps}gbps" + ("" if watch else "-fixed-threshold")
                    out["phases"][name] = {"gbps": gbps, "rate_bytes_per_s": gbps * 1e9 / 8 * LINK_SCALE,
                                           "watches_link": watch, **phase(router, prompts, want)}
                    print(name, {k: v for k, v in out["phases"][name].items() if k != "requests"}, flush=True)
    Path(__file__).with_suffix(".json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
