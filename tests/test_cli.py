"""The command line: `moejax generate` on the embedded model and on a checkpoint, JSON output, errors."""

import json
from pathlib import Path

from moejax.cli import main

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
    assert "tiny-qwen3-moe" in out and "tokens/s" in out


def test_bad_request_is_one_clear_line(capsys):
    assert main(["generate", "--prompt-token-ids", "1,99999", "--max-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moejax: error: prompt token ids [99999] are outside the vocabulary [0, 512)")


def test_text_without_tokenizer_is_rejected(capsys):
    assert main(["generate", "--prompt", "hi"]) == 2
    assert "has no tokenizer" in capsys.readouterr().err
