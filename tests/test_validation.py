"""One validation for every front end (LLM, CLI, HTTP: tests/test_serve.py) and what a new user hit:
unsupported dtypes, float token ids, max_tokens beyond the context, unknown request ids, zero sizes and
rates, a context too small for a workload, weights too big for the machine are clear errors naming
the field; an aborted stream ends with a final delta saying so."""

import pytest

from moejax import LLM, SamplingParams
from moejax.checkpoint import load_model
from moejax.cli import main
from moejax.config import ConfigError
from moejax.engine import build
from moejax.engine.sampling import RequestError
from moejax.sim.workloads import make_workload


@pytest.fixture(scope="module")
def llm():
    return LLM("tiny-qwen3-moe", max_model_len=64, num_blocks=32, block_size=16)


@pytest.mark.parametrize("dtype", ["int8", "bogus", "float64"])
def test_only_supported_dtypes(dtype):
    with pytest.raises(ConfigError, match=rf"dtype='{dtype}' is not supported: use one of float32, bfloat16"):
        LLM("tiny-qwen3-moe", dtype=dtype)


@pytest.mark.parametrize("prompts", [[[1.5, 2]], [1.5, 2], [[1, True]]])
def test_token_ids_must_be_integers(llm, prompts):
    with pytest.raises(RequestError, match=r"prompt\[\d\] = (1.5|True): token ids must be integers") as e:
        llm.generate(prompts)
    assert e.value.param == "prompt"
    assert not llm.engine.has_unfinished  # nothing was queued


def test_max_tokens_beyond_the_context_is_an_error(llm, capsys):
    with pytest.raises(RequestError, match=r"max_tokens=100000 with a prompt of 3 tokens exceeds max_model_len=64: "
                                           r"at most 61") as e:
        llm.generate([[1, 2, 3]], SamplingParams(max_tokens=100000))
    assert e.value.param == "max_tokens"
    assert main(["generate", "--prompt-token-ids", "1,2,3", "--max-tokens", "100000"]) == 2
    assert "max_tokens=100000 with a prompt of 3 tokens exceeds max_model_len=" in capsys.readouterr().err


def test_aborted_stream_ends_with_an_abort_delta_and_unknown_ids_are_errors(llm):
    deltas = []
    for delta in llm.stream([[1, 2, 3], [4, 5]], SamplingParams(max_tokens=20, ignore_eos=True)):
        deltas.append(delta)
        if len(deltas) == 2:
            llm.abort(delta.request_id)
    aborted = [d for d in deltas if d.request_id == deltas[1].request_id]
    assert aborted[-1].finished and aborted[-1].finish_reason == "abort"
    other = [d for d in deltas if d.request_id != deltas[1].request_id]
    assert other[-1].finish_reason == "length" and sum(len(d.token_ids) for d in other) == 20
    llm.abort(deltas[1].request_id)  # finished already: nothing to do
    with pytest.raises(RequestError, match="abort: no request 12345"):
        llm.abort(12345)
    assert llm.engine.scheduler.kv.num_free_blocks == llm.engine.scheduler.kv.num_blocks


@pytest.mark.parametrize("option, value", [("token_budget", 0), ("max_num_seqs", 0), ("block_size", 0),
                                           ("max_model_len", 1)])
def test_engine_sizes_must_be_positive(llm, option, value):
    with pytest.raises(ValueError, match=rf"{option}={value}: must be an integer >= "):
        build(llm.model, **{option: value})


@pytest.mark.parametrize("value", [-0.1, "1", True, float("nan")])
def test_max_iteration_s_must_be_seconds(llm, value):
    with pytest.raises(ValueError, match=r"max_iteration_s=.*: must be a number of seconds >= 0"):
        build(llm.model, max_iteration_s=value)


def test_workload_errors_name_the_setting():
    with pytest.raises(ValueError, match="num_requests must be >= 1, got 0"):
        make_workload("sharegpt", rate=1.0, num_requests=0)
    with pytest.raises(ValueError, match=r"rate must be positive \(requests per second"):
        make_workload("sharegpt", rate=0.0, num_requests=4)
    with pytest.raises(ValueError, match="max_model_len=10 is too small for workload 'sharegpt': its prompts have a "
                                         "median of 180 tokens"):
        make_workload("sharegpt", rate=1.0, num_requests=4, max_model_len=10)


def test_weights_too_big_are_refused_before_allocating(monkeypatch):
    import moejax.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "_host_available_bytes", lambda: 1 << 20)  # 1 MiB free
    with pytest.raises(ConfigError, match=r"tiny-qwen3-moe needs 0\.\d GiB for its weights \(float32, 1 of 1 devices "
                                          r"on this process\), but 0\.0 GiB of host memory is available"):
        load_model("tiny-qwen3-moe")


def test_compare_table_is_whole_when_piped(capsys):
    """Piped, rich assumes 80 columns; the table keeps its policy and ratio headers whole."""
    assert main(["compare", "--policies", "chunked@512,chunked@256,layered", "--hardware", "h100x2",
                 "--workload", "arxiv", "--rate", "1.3", "--num-requests", "6"]) == 0
    header = next(line for line in capsys.readouterr().out.splitlines() if "metric" in line)
    for name in ("chunked@512", "chunked@256", "layered", "chunked@256/chunked@512", "layered/chunked@512"):
        assert f" {name} " in header, header
