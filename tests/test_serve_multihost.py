"""`moejax serve` over 2 processes x 4 CPU devices on loopback (`python -m moejax.launch`): process 0
serves HTTP and broadcasts the requests, process 1 follows; greedy outputs equal the single-process
LLM on the same layout, and stopping process 0 stops both."""

import signal
import time

import httpx
import openai
import pytest

from moejax import LLM, SamplingParams
from test_multihost import PROCESS_TIMEOUT_S, SERVING, finish, free_port, launch, stop

PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9], [(11 * i + 3) % 500 for i in range(29)]]


@pytest.mark.slow
def test_two_processes_serve_as_one(tmp_path):
    llm = LLM("tiny-qwen3-moe", layout="cpu8-ep", max_model_len=64, token_budget=8)  # as SERVING
    want = [o.token_ids for o in llm.generate(PROMPTS, SamplingParams(max_tokens=8, ignore_eos=True))]

    port, http_port = free_port(), free_port()
    command = ["moejax", "serve", "--model", "tiny-qwen3-moe", *SERVING, "--port", str(http_port),
               "--log-level", "warning"]
    procs = [launch(pid, port, command, tmp_path) for pid in (0, 1)]
    try:
        deadline = time.monotonic() + PROCESS_TIMEOUT_S
        while True:
            assert all(p.poll() is None for p in procs), (tmp_path / "err0").read_text()[-3000:] + \
                (tmp_path / "err1").read_text()[-3000:]
            assert time.monotonic() < deadline, "the server did not come up"
            try:
                if httpx.get(f"http://127.0.0.1:{http_port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="unused", max_retries=0,
                               timeout=PROCESS_TIMEOUT_S)
        out = client.completions.create(model="tiny-qwen3-moe", prompt=PROMPTS, max_tokens=8, temperature=0,
                                        extra_body={"ignore_eos": True, "return_token_ids": True})
        assert [c.token_ids for c in sorted(out.choices, key=lambda c: c.index)] == want
        one = client.completions.create(model="tiny-qwen3-moe", prompt=PROMPTS[1], max_tokens=8, temperature=0,
                                        stream=True, extra_body={"ignore_eos": True, "return_token_ids": True})
        assert [t for chunk in one for t in chunk.choices[0].token_ids] == want[1]  # requests over time too
        procs[0].send_signal(signal.SIGTERM)  # uvicorn shuts down; process 1 gets the stop and ends
        codes = finish(procs, 120)
        assert codes == [0, 0], (tmp_path / "err0").read_text()[-3000:] + (tmp_path / "err1").read_text()[-3000:]
    finally:
        stop(procs)
