"""N concurrent streaming clients against `moejax serve` on loopback, beside the same workload through
`LLM` in-process: TTFT / TBT / e2e percentiles and throughput of both, and the HTTP overhead as their
ratios, measured in one run (rounds alternate: LLM, HTTP, LLM, HTTP, ...). Writes http_load.json.

    .venv/bin/python benchmarks/http_load.py                       # 256 streams of stdlib-moe
    .venv/bin/python benchmarks/http_load.py --clients 32 --rounds 1   # quick
    .venv/bin/python benchmarks/http_load.py --fuse                # whole iterations as one program

Both sides serve the same requests with the same engine (one LLM: the server runs on its engine), all
arriving at once, greedy with ignore_eos so every request produces exactly --output-len tokens. The
in-process side is `engine.run` (the engine's own clock); the HTTP side is measured by the clients
(httpx, one connection per stream, SSE parsed) from sending a request to each token's chunk, so its
times include the server's HTTP and detokenization work and the clients' own, on the same CPU. Every
stream must end with finish_reason "length" and all its tokens: a lost or short stream fails the run.
Warm-up: the workload is served each way, untimed, until a pass compiles nothing (at most
--max-warmups passes): which shapes a server compiles depends on how arrivals fall into iterations.
Compilations left in the timed rounds are reported with them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import time
from pathlib import Path

import httpx
import jax
import numpy as np

from moejax import LLM, SamplingParams
from moejax.engine.compiles import count_compilations
from moejax.engine.engine import Arrival
from moejax.serve.app import running_server

OUT = Path(__file__).with_suffix(".json")


def percentiles(values: list[float]) -> dict:
    v = np.asarray(values)
    return {"mean": float(v.mean()), "p50": float(np.percentile(v, 50)), "p90": float(np.percentile(v, 90)),
            "p99": float(np.percentile(v, 99))}


def summary(ttft: list[float], tbt: list[float], e2e: list[float], tokens: int, seconds: float) -> dict:
    return {"ttft_s": percentiles(ttft), "tbt_s": percentiles(tbt), "e2e_s": percentiles(e2e),
            "output_tokens": tokens, "seconds": seconds, "output_tokens_per_s": tokens / seconds,
            "requests_per_s": len(e2e) / seconds}


def in_process(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> dict:
    engine = llm.engine
    served = engine.run([Arrival(0.0, p, params) for p in prompts])
    assert all(r.num_output_tokens == params.max_tokens for r in served), "a request came back short"
    start = min(r.arrival_time for r in served)
    seconds = max(r.finish_time for r in served) - start
    gaps = [g for r in served for g in np.diff(r.token_times)]
    engine.finished.clear()
    engine.steps.clear()
    return summary([r.first_token_time - r.arrival_time for r in served], gaps,
                   [r.finish_time - r.arrival_time for r in served], sum(r.num_output_tokens for r in served), seconds)


async def one_stream(http: httpx.AsyncClient, url: str, prompt: list[int], output_len: int, timeout_s: float):
    body = {"model": "stdlib-moe", "prompt": prompt, "max_tokens": output_len, "temperature": 0, "ignore_eos": True,
            "stream": True, "return_token_ids": True}
    sent = time.perf_counter()
    times, tokens, finish = [], 0, None
    async with http.stream("POST", f"{url}/v1/completions", json=body, timeout=timeout_s) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            if choice["token_ids"]:
                times.append(time.perf_counter())
                tokens += len(choice["token_ids"])
            finish = choice["finish_reason"] or finish
    return sent, times, tokens, finish


async def over_http(url: str, prompts: list[list[int]], output_len: int, timeout_s: float) -> dict:
    limits = httpx.Limits(max_connections=len(prompts) + 8, max_keepalive_connections=len(prompts) + 8)
    async with httpx.AsyncClient(limits=limits) as http:
        start = time.perf_counter()
        results = await asyncio.gather(*(one_stream(http, url, p, output_len, timeout_s) for p in prompts))
        seconds = time.perf_counter() - start
    lost = [i for i, (_, _, n, finish) in enumerate(results) if n != output_len or finish != "length"]
    assert not lost, f"streams {lost[:10]} ended short or without finish_reason 'length'"
    return summary([times[0] - sent for sent, times, _, _ in results],
                   [g for _, times, _, _ in results for g in np.diff(times)],
                   [times[-1] - sent for sent, times, _, _ in results], sum(r[2] for r in results), seconds)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=256, help="concurrent streams (= requests)")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--fuse", action="store_true",
                   help="run whole iterations as one program (default: layer by layer, whose one layer program "
                        "compiles ~3x faster: on 2 shared cores compiling the shapes 256 streams need dominates)")
    p.add_argument("--rounds", type=int, default=2, help="LLM / HTTP pairs, alternating")
    p.add_argument("--timeout", type=float, default=600, help="seconds a stream may take at most")
    p.add_argument("--max-warmups", type=int, default=3, help="untimed passes at most")
    p.add_argument("--json", type=Path, default=OUT)
    args = p.parse_args()

    llm = LLM("stdlib-moe", max_num_seqs=args.clients, max_model_len=args.prompt_len + args.output_len + 16,
              fuse=args.fuse)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, llm.config.vocab_size, args.prompt_len).tolist() for _ in range(args.clients)]
    params = SamplingParams(max_tokens=args.output_len, ignore_eos=True)
    t0 = time.perf_counter()
    rounds, warmups = [], []
    with running_server(llm, max_waiting=0) as url:
        # the server's engine thread idles while LLM runs the same engine from here, and vice versa
        for _ in range(args.max_warmups):
            with count_compilations() as compiled:
                in_process(llm, prompts, params)
                asyncio.run(over_http(url, prompts, args.output_len, args.timeout))
            warmups.append(compiled.count)
            print(f"warm-up pass: {compiled.count} compilations", flush=True)
            if compiled.count == 0:
                break
        warmup_s = time.perf_counter() - t0
        for i in range(args.rounds):
            with count_compilations() as llm_compiled:
                llm_side = in_process(llm, prompts, params)
            with count_compilations() as http_compiled:
                http_side = asyncio.run(over_http(url, prompts, args.output_len, args.timeout))
            llm_side["compilations"], http_side["compilations"] = llm_compiled.count, http_compiled.count
            rounds.append({"llm": llm_side, "http": http_side})
            print(f"round {i}: LLM {llm_side['output_tokens_per_s']:.0f} tok/s, HTTP "
                  f"{http_side['output_tokens_per_s']:.0f} tok/s", flush=True)

    def ratio(path) -> list[float]:
        def get(d):
            for k in path:
                d = d[k]
            return d
        return [get(r["http"]) / get(r["llm"]) for r in rounds]

    result = {
        "machine": {"hostname": socket.gethostname(), "platform": platform.platform(), "cpus": os.cpu_count(),
                    "jax_backend": jax.default_backend(), "devices": jax.device_count(),
                    "load_average_at_end": os.getloadavg()},
        "settings": {"model": "stdlib-moe", "dtype": llm.model.dtype.name, "clients": args.clients,
                     "prompt_len": args.prompt_len, "output_len": args.output_len, "rounds": args.rounds,
                     "max_num_seqs": args.clients, "policy": "chunked", "fuse": args.fuse, "warmup_s": warmup_s,
                     "warmup_compilations": warmups},
        "rounds": rounds,
        "http_over_llm": {"output_tokens_per_s": ratio(("output_tokens_per_s",)),
                          "ttft_p50": ratio(("ttft_s", "p50")), "ttft_p99": ratio(("ttft_s", "p99")),
                          "tbt_p50": ratio(("tbt_s", "p50")), "tbt_p99": ratio(("tbt_s", "p99")),
                          "e2e_p50": ratio(("e2e_s", "p50"))},
        "streams_completed": args.clients * args.rounds,
    }
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["http_over_llm"], indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
