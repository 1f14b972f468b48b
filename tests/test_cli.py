"""The command line: `moejax generate` on the embedded model and on a checkpoint, JSON output, errors."""

import json
import re
from pathlib import Path

from moejax import LLM, SamplingParams
from moejax.cli import DEFAULT_PROMPTS, main

FIXTURES = Path(__file__).parent / "fixtures"


def test_generate_json_on_checkpoint(capsys):
    ckpt = FIXTURES / "hf" / "qwen3_moe"
    assert main(["generate", "--checkpoint", str(ckpt), "--prompt", "Hello", "--prompt-token-ids", "5,6,7",
                 "--max-tokens", "16", "--ignore-eos", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    ref = json.loads((FIXTURES / "reference" / "qwen3_moe.json").read_text())
    hello = ref["text_prompts"].index("Hello")
    import numpy as np
    npz = np.load(FIXTURES / "reference" / "qwen3_moe.npz")
    assert out["outputs"][0]["token_ids"] == npz["text_greedy_ids"][hello].tolist()
    assert out["outputs"][0]["text"] is not None
    assert out["outputs"][1]["prompt_token_ids"] == [5, 6, 7]
    assert len(out["outputs"][1]["token_ids"]) == 16


def test_generate_default_model_table(capsys):
    assert main(["generate", "--max-tokens", "4"]) == 0
    out = capsys.readouterr().out
    want = LLM("tiny-qwen3-moe").generate(DEFAULT_PROMPTS, SamplingParams(max_tokens=4))  # greedy, seed 0
    assert "tiny-qwen3-moe (" in out and f"{len(DEFAULT_PROMPTS)} prompts" in out
    for prompt, o in zip(DEFAULT_PROMPTS, want):  # one row per prompt: its length and its greedy tokens
        assert f"{len(prompt)} token ids" in out and " ".join(map(str, o.token_ids)) in out
    assert f"{sum(len(o.token_ids) for o in want)} tokens in " in out and "tokens/s" in out


def test_bad_request_is_one_clear_line(capsys):
    assert main(["generate", "--prompt-token-ids", "1,99999", "--max-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moejax: error: prompt token ids [99999] are outside the vocabulary [0, 512)")


def test_text_without_tokenizer_is_rejected(capsys):
    assert main(["generate", "--prompt", "hi"]) == 2
    assert "has no tokenizer" in capsys.readouterr().err


def test_simulate_json_has_stable_metrics(tmp_path, capsys):
    path = tmp_path / "sim.json"
    assert main(["simulate", "--model", "qwen3-30b-a3b", "--hardware", "h100x2", "--policy", "chunked",
                 "--workload", "arxiv", "--rate", "1.3", "--num-requests", "12", "--json", str(path)]) == 0
    out = json.loads(path.read_text())
    for key in ("model", "hardware", "policy", "workload", "rate", "seed"):
        assert key in out
    for m in ("num_requests", "ttft_mean_s", "ttft_p50_s", "ttft_p99_s", "tbt_mean_s", "tbt_p50_s", "tbt_p99_s",
              "e2e_mean_s", "requests_per_s", "output_tokens_per_s", "expert_bytes_total", "expert_bytes_per_token",
              "slo_attainment"):
        assert out["metrics"][m] is not None, m
    assert out["metrics"]["num_requests"] == 12 and out["simulated"] and out["hardware"] == "h100x2"
    assert "ttft_mean_s" in capsys.readouterr().out


# every run below on one engine shape (its KV cache and token budget): the runs' warm-ups share 4 compiled
# prefill programs (8 .. 64 tokens) and one decode program instead of compiling their own
ENGINE_SHAPE = ["--max-model-len", "64", "--token-budget", "64"]


def test_bench_serve_and_compare_real(tmp_path, capsys):
    path = tmp_path / "cmp.json"
    assert main(["compare", "--policies", "chunked@64,layered", "--workload", "sharegpt", "--rate", "inf",
                 "--num-requests", "4", *ENGINE_SHAPE, "--json", str(path)]) == 0
    runs = json.loads(path.read_text())["runs"]
    assert set(runs) == {"chunked@64", "layered"}
    for r in runs.values():
        m = r["metrics"]
        assert not r["simulated"] and m["num_requests"] == 4 and m["expert_bytes_total"] > 0
        assert 0 < m["ttft_mean_s"] <= m["e2e_mean_s"] and m["output_tokens_per_s"] > 0
    out = capsys.readouterr().out
    assert "layered/chunked@64" in out and f"wrote {path}" in out  # the table has the ratio column

    path = tmp_path / "serve.json"
    assert main(["bench", "serve", "--policy", "no_chunk", "--num-requests", "3", "--rate", "inf", *ENGINE_SHAPE,
                 "--json", str(path)]) == 0
    r = json.loads(path.read_text())
    m = r["metrics"]
    assert (r["model"], r["policy"], r["simulated"]) == ("tiny-qwen3-moe", "no_chunk", False)
    assert m["num_requests"] == 3 and 0 < m["ttft_mean_s"] <= m["e2e_mean_s"] and m["expert_bytes_total"] > 0
    out = capsys.readouterr().out
    assert "no_chunk" in out and re.search(r"num_requests\s*│\s*3\s*│", out)  # title, the table's row
