"""`moejax serve` over real HTTP: a uvicorn server on a loopback port, driven by the official `openai`
client (and httpx for what the client hides). One server for the module, on the shipped trained
stdlib-moe (its tokenizer and chat template) in float32: greedy outputs equal `LLM.generate`'s, with
and without streaming, batched or not; stop strings; logprobs equal a plain forward's; usage; 400s
naming the field; 429 with Retry-After when full; a client that disconnects frees its KV; an engine
fault is a 500 for its request only and the server goes on; fuzzed bodies never get a 500 or hang."""

import contextlib
import json
import re
import time

import httpx
import numpy as np
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moejax import LLM, SamplingParams
from moejax.models.reference import prompt_logits
from moejax.serve.app import running_server

MAX_NUM_SEQS = 4  # with max_waiting=0: the fifth request in flight is a 429
MAX_MODEL_LEN = 96
PROMPTS = ["import os\n", "def parse(", "class Reader:\n    def "]
GREEDY = dict(temperature=0, max_tokens=10, extra_body={"ignore_eos": True, "return_token_ids": True})
POISON = 4095  # a prompt holding this token makes the test executor fail (an engine fault)
SLOW = 4094  # iterations running a request whose prompt holds this token take SLOW_S longer
SLOW_S = 0.05


@pytest.fixture(scope="module")
def llm():
    # fuse=False: the 8 layers share one compiled layer program per shape, instead of one 8-layer
    # program per shape (compiling is most of this file's time on 2 cores)
    return LLM("stdlib-moe", dtype="float32", max_model_len=MAX_MODEL_LEN, max_num_seqs=MAX_NUM_SEQS,
               num_blocks=64, block_size=16, fuse=False)


@pytest.fixture(scope="module")
def reference(llm):
    """LLM.generate's greedy outputs, before the server owns the engine."""
    return llm.generate(PROMPTS, SamplingParams(max_tokens=10, ignore_eos=True))


@pytest.fixture(scope="module")
def server(llm, reference):
    execute, slow = llm.engine.executor.execute, set()

    def instrumented(plan):  # fails on iterations holding the poison token; slow for the slow requests
        slow.update(s.request_id for s in plan.slices if SLOW in s.token_ids)
        if any(POISON in s.token_ids for s in plan.slices):
            raise RuntimeError("injected fault")
        if any(s.request_id in slow for s in plan.slices):
            time.sleep(SLOW_S)
        return execute(plan)

    llm.engine.executor.execute = instrumented
    with running_server(llm, max_waiting=0) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)


def metric(server: str, name: str, **labels) -> float:
    """The sum of a Prometheus metric's samples with these labels."""
    total = 0.0
    for line in httpx.get(f"{server}/metrics").text.splitlines():
        m = re.fullmatch(rf"{name}(?:{{(.*)}})? (\S+)", line)
        if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
            total += float(m.group(2))
    return total


def wait_until(condition, what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == ["stdlib-moe"]
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}


def test_completions_greedy_equal_llm_generate(client, reference):
    out = client.completions.create(model="stdlib-moe", prompt=PROMPTS, **GREEDY)  # a batch of prompts
    assert [c.token_ids for c in sorted(out.choices, key=lambda c: c.index)] == [r.token_ids for r in reference]
    assert [c.text for c in sorted(out.choices, key=lambda c: c.index)] == [r.text for r in reference]
    assert all(c.finish_reason == "length" for c in out.choices)
    assert out.usage.completion_tokens == 30
    assert out.usage.prompt_tokens == sum(len(r.prompt_token_ids) for r in reference)
    ids = client.completions.create(model="stdlib-moe", prompt=reference[1].prompt_token_ids, **GREEDY)
    assert ids.choices[0].token_ids == reference[1].token_ids  # a prompt given as token ids


def test_streaming_equals_whole(client, reference):
    stream = client.completions.create(model="stdlib-moe", prompt=PROMPTS[0], stream=True,
                                       stream_options={"include_usage": True}, **GREEDY)
    chunks = list(stream)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert "".join(c.choices[0].text for c in chunks[:-1]) == reference[0].text
    assert [t for c in chunks[:-1] for t in c.choices[0].token_ids] == reference[0].token_ids
    assert [c.choices[0].finish_reason for c in chunks[:-1]][-1] == "length"


def test_stop_string_cuts_the_text(client, reference):
    text = reference[0].text
    stop = text[5:8]
    out = client.completions.create(model="stdlib-moe", prompt=PROMPTS[0], stop=[stop], **GREEDY)
    assert out.choices[0].text == text[:text.index(stop)] and out.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model="stdlib-moe", prompt=PROMPTS[0], stop=stop, stream=True, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks) == text[:text.index(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_stop_token_ids(client, reference):
    stop_id = reference[2].token_ids[4]
    out = client.completions.create(model="stdlib-moe", prompt=PROMPTS[2], temperature=0, max_tokens=10,
                                    extra_body={"stop_token_ids": [stop_id], "return_token_ids": True})
    want = reference[2].token_ids[:reference[2].token_ids.index(stop_id) + 1]
    assert out.choices[0].token_ids == want and out.choices[0].finish_reason == "stop"


def test_chat_uses_the_template(client, llm):
    messages = [{"role": "user", "content": "Join paths"}]
    prompt = llm.apply_chat_template(messages)  # the template itself: tests/test_chat_template.py
    assert prompt == "# Join paths\ndef "
    out = client.chat.completions.create(model="stdlib-moe", messages=messages, temperature=0, max_tokens=8,
                                         extra_body={"ignore_eos": True, "return_token_ids": True})
    choice = out.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == llm.decode(choice.token_ids)
    assert out.usage.prompt_tokens == len(llm.encode(prompt)) and out.usage.completion_tokens == 8
    stream = client.chat.completions.create(model="stdlib-moe", messages=messages, temperature=0,
                                            max_completion_tokens=8, stream=True,
                                            extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == choice.message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_logprobs_equal_a_plain_forward(client, llm, reference):
    out = client.chat.completions.create(model="stdlib-moe", messages=[{"role": "user", "content": "Sort a list"}],
                                         temperature=0, max_tokens=6, logprobs=True, top_logprobs=3,
                                         extra_body={"ignore_eos": True, "return_token_ids": True})
    choice = out.choices[0]
    prompt = llm.encode(llm.apply_chat_template([{"role": "user", "content": "Sort a list"}]))
    logits = prompt_logits(llm.model, prompt + choice.token_ids[:-1])[len(prompt) - 1:]
    want = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    for i, (t, entry) in enumerate(zip(choice.token_ids, choice.logprobs.content)):
        assert entry.logprob == pytest.approx(want[i, t], abs=1e-4)
        top = np.argsort(-want[i])[:3]
        assert [e.logprob for e in entry.top_logprobs] == pytest.approx(want[i, top].tolist(), abs=1e-4)
        assert entry.top_logprobs[0].token == entry.token  # greedy: the most likely token
    comp = client.completions.create(model="stdlib-moe", prompt=PROMPTS[0], logprobs=2, **GREEDY)
    lp = comp.choices[0].logprobs
    assert len(lp.token_logprobs) == 10 and all(len(t) <= 2 for t in lp.top_logprobs)
    assert "".join(lp.tokens) == reference[0].text and lp.text_offset[0] == 0


def test_sampling_is_seeded(client):
    ask = dict(model="stdlib-moe", prompt=PROMPTS[1], temperature=0.9, top_p=0.95, max_tokens=8, seed=7,
               extra_body={"top_k": 50, "ignore_eos": True, "return_token_ids": True})
    a, b = client.completions.create(n=2, **ask), client.completions.create(n=2, **ask)
    assert [c.token_ids for c in a.choices] == [c.token_ids for c in b.choices]
    assert a.choices[0].token_ids != a.choices[1].token_ids  # n choices draw differently


@pytest.mark.parametrize("body, param", [
    ({"prompt": [1.5, 2]}, "prompt"),  # a float is not a token id (never truncated)
    ({"prompt": [1, 99999]}, "prompt"),
    ({"prompt": "x" * 400}, "prompt"),  # longer than the context: a 400, never a truncation
    ({"prompt": "x", "max_tokens": 100000}, "max_tokens"),
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "logprobs": 21}, "logprobs"),
    ({"prompt": "x", "seed": "1"}, "seed"),
    ({"prompt": "x", "bogus": 1}, "bogus"),
    ({"prompt": "x", "presence_penalty": 0.5}, "presence_penalty"),
    ({"prompt": "x", "model": "gpt-4"}, "model"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": ""}, "prompt"),
])
def test_bad_completions_are_400_naming_the_field(server, body, param):
    r = httpx.post(f"{server}/v1/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0}, "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
])
def test_bad_chat_is_400_naming_the_field(server, body, param):
    r = httpx.post(f"{server}/v1/chat/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_disconnects_free_kv_and_a_full_server_is_429(client, server):
    """MAX_NUM_SEQS streams fill the server (slow ones: 80 tokens take >= 4 s): one more is a 429 with
    Retry-After; clients that go away abort their requests, whose KV blocks return to free."""
    with httpx.Client(timeout=60) as http, contextlib.ExitStack() as open_streams:
        lines = []  # kept: dropping a line iterator closes its connection
        for i in range(MAX_NUM_SEQS):
            response = open_streams.enter_context(http.stream(
                "POST", f"{server}/v1/completions",
                json={"prompt": [SLOW, i + 1], "max_tokens": 80, "temperature": 0, "ignore_eos": True,
                      "stream": True}))
            lines.append(response.iter_lines())
            assert next(lines[-1]).startswith("data: ")  # running: its first token came
        assert metric(server, "moejax_kv_blocks_used") > 0
        with pytest.raises(openai.RateLimitError) as full:
            client.completions.create(model="stdlib-moe", prompt="x", max_tokens=2)
        assert full.value.response.headers["Retry-After"] == "1"
        aborted = metric(server, "moejax_requests_finished_total", finish_reason="abort")
        open_streams.close()  # the clients go away mid-stream
    wait_until(lambda: not metric(server, "moejax_kv_blocks_used")
               and not metric(server, "moejax_num_requests_running"),
               "aborted requests kept their KV blocks")
    assert metric(server, "moejax_requests_finished_total", finish_reason="abort") \
        == aborted + MAX_NUM_SEQS
    assert client.completions.create(model="stdlib-moe", prompt="x", max_tokens=2).choices  # room again
    with pytest.raises(httpx.ReadTimeout):  # a client of a non-streaming request gives up
        httpx.post(f"{server}/v1/completions", timeout=1.0,
                   json={"prompt": [SLOW, 9], "max_tokens": 80, "temperature": 0, "ignore_eos": True})
    wait_until(lambda: metric(server, "moejax_requests_finished_total", finish_reason="abort")
               == aborted + MAX_NUM_SEQS + 1 and not metric(server, "moejax_kv_blocks_used"),
               "a non-streaming request went on after its client left")


def test_engine_fault_is_a_500_for_its_request_only(client, server, reference):
    with pytest.raises(openai.InternalServerError) as fault:
        client.completions.create(model="stdlib-moe", prompt=[1, POISON, 2], max_tokens=4)
    assert fault.value.response.json()["error"]["code"] == "engine_fault"
    stream = client.completions.create(model="stdlib-moe", prompt=[POISON], max_tokens=4, stream=True)
    with pytest.raises(openai.APIError, match="the engine failed on this request"):
        list(stream)  # a stream under way gets an error event
    assert httpx.get(f"{server}/health").status_code == 200  # the server goes on
    out = client.completions.create(model="stdlib-moe", prompt=PROMPTS[0], **GREEDY)
    assert out.choices[0].token_ids == reference[0].token_ids


def test_metrics_report_latencies_and_traffic(server):
    text = httpx.get(f"{server}/metrics").text
    for name in ("moejax_time_to_first_token_seconds_count", "moejax_time_between_tokens_seconds_count",
                 "moejax_e2e_request_latency_seconds_count", "moejax_expert_bytes_read_total",
                 "moejax_generation_tokens_total"):
        assert metric(server, name) > 0, name
    assert "moejax_num_requests_waiting" in text and "moejax_preemptions_total" in text


# --- fuzzing ---------------------------------------------------------------------------------------------

anything = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True)
                        | st.text(max_size=8), lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
small_int = st.integers(-3, 8)
token_ids = st.lists(st.integers(-5, 5000) | st.floats(-2, 10), max_size=6)
COMMON = {
    "model": st.sampled_from(["stdlib-moe", "other"]) | anything, "max_tokens": small_int | anything,
    "temperature": st.floats(-1, 3) | anything, "top_p": st.floats(-0.5, 1.5) | anything,
    "n": small_int | anything, "stream": st.booleans() | anything, "stop": st.text(max_size=3) | anything,
    "seed": st.integers(-5, 2**33) | anything, "top_k": small_int | anything, "ignore_eos": st.booleans(),
    "stop_token_ids": token_ids | anything, "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()})
    | anything, "presence_penalty": st.just(0) | anything, "logit_bias": st.just({}) | anything,
    "bogus_field": anything,
}
COMPLETION = {**COMMON, "prompt": st.text(max_size=20) | token_ids | st.lists(st.text(max_size=5), max_size=3)
              | anything, "logprobs": small_int | anything, "echo": st.booleans()}
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool"]) | anything,
                                 "content": st.text(max_size=20) | anything})
CHAT = {**COMMON, "messages": st.lists(message, max_size=3) | anything, "logprobs": st.booleans() | anything,
        "top_logprobs": small_int | anything, "max_completion_tokens": small_int | anything}


def bodies(fields: dict):
    """A body of some of the fields (max_tokens always, so that a valid body runs a few tokens only)."""
    optional = {k: v for k, v in fields.items() if k != "max_tokens"}
    return st.fixed_dictionaries({"max_tokens": small_int}, optional=optional) | anything


def check_answer(r: httpx.Response) -> None:
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        error = r.json()["error"]
        assert error["message"] and (error["param"] or r.status_code != 400), r.text


@pytest.mark.parametrize("route, fields", [("completions", COMPLETION), ("chat/completions", CHAT)])
def test_fuzzed_bodies_never_500_or_hang(server, route, fields):
    http = httpx.Client(timeout=30)  # a hang fails the request

    @settings(max_examples=60, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(body=bodies(fields))
    def run(body):
        check_answer(http.post(f"{server}/v1/{route}", content=json.dumps(body)))

    run()
    assert httpx.get(f"{server}/health").status_code == 200
