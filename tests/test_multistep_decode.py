"""Multi-step decode: several decode steps in one compiled program give the tokens one step at a time
gives (greedy and seeded, every architecture), stop where one step at a time stops, account the same
expert bytes, and stream / abort at the granularity of an iteration."""

import numpy as np
import pytest

from moejax.config import get_preset
from moejax.engine import build
from moejax.engine.sampling import SamplingParams
from moejax.models.model import build_model

ARCHS = ["tiny-qwen3-moe", "tiny-mixtral", "tiny-qwen2-moe", "tiny-olmoe"]


def serve(model, prompts, params, steps, **options):
    engine = build(model, max_model_len=64, block_size=4, num_blocks=128, max_decode_steps=steps, **options)
    reqs = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    plans = []
    while engine.has_unfinished:
        plans.append(engine.step())
    assert engine.scheduler.kv.num_free_blocks == engine.scheduler.kv.num_blocks
    return reqs, plans, engine


@pytest.mark.parametrize("arch", ARCHS)
def test_multi_step_equals_one_step(arch):
    model = build_model(get_preset(arch), seed=5)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, model.config.vocab_size, n).tolist() for n in (3, 17, 8, 26)]
    params = [SamplingParams(max_tokens=11, ignore_eos=True),  # not a multiple of the steps
              SamplingParams(max_tokens=9, temperature=0.9, top_p=0.8, seed=3, ignore_eos=True),
              SamplingParams(max_tokens=20, temperature=1.2, top_k=20, seed=4, ignore_eos=True),
              SamplingParams(max_tokens=40, ignore_eos=True)]  # stopped by max_model_len (64)
    one, plans_one, _ = serve(model, prompts, params, 1)
    many, plans_many, _ = serve(model, prompts, params, 8)
    assert [r.output_token_ids for r in many] == [r.output_token_ids for r in one]
    assert [r.finish_reason for r in many] == [r.finish_reason for r in one] == ["length"] * 4
    assert len(many[3].output_token_ids) == 64 - 26
    assert max(p.plan.decode_steps for p in plans_many) == 8 and all(p.plan.decode_steps == 1 for p in plans_one)
    assert len(plans_many) < len(plans_one) / 3
    bytes_one = sum(p.result.expert_bytes for p in plans_one)
    assert sum(p.result.expert_bytes for p in plans_many) == bytes_one  # same rows each step, same routing


@pytest.mark.parametrize("arch", ARCHS)
def test_run_ahead_equals_serial(arch, monkeypatch):
    """Dispatching the next multi-step iteration before the last one's tokens are back changes no
    output, also where requests stop on a token or their length inside an iteration run ahead of,
    and frees every block (serve checks)."""
    from moejax.engine.scheduler import Scheduler

    launched_ahead = []
    schedule_ahead = Scheduler.schedule_ahead
    monkeypatch.setattr(Scheduler, "schedule_ahead",
                        lambda self, *a: launched_ahead.append(schedule_ahead(self, *a)) or launched_ahead[-1])
    model = build_model(get_preset(arch), seed=5)
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, model.config.vocab_size, n).tolist() for n in (4, 11, 7, 19, 2)]
    free, _, _ = serve(model, prompts, [SamplingParams(max_tokens=30, ignore_eos=True)] * 5, 4, run_ahead=False)
    params = [SamplingParams(max_tokens=30, stop_token_ids=(free[0].output_token_ids[9],)),  # stops mid-way
              SamplingParams(max_tokens=13, temperature=0.9, top_p=0.8, seed=3, ignore_eos=True),
              SamplingParams(max_tokens=30, temperature=1.1, top_k=20, seed=4, ignore_eos=True),
              SamplingParams(max_tokens=5, ignore_eos=True),
              SamplingParams(max_tokens=27, stop_token_ids=(free[4].output_token_ids[14],))]
    serial, plans_serial, _ = serve(model, prompts, params, 4, run_ahead=False)
    assert not launched_ahead
    ahead, plans_ahead, _ = serve(model, prompts, params, 4)
    assert [r.output_token_ids for r in ahead] == [r.output_token_ids for r in serial]
    assert [r.finish_reason for r in ahead] == [r.finish_reason for r in serial]
    assert {serial[0].finish_reason, serial[4].finish_reason} == {"stop"}
    assert sum(p is not None for p in launched_ahead) >= 3


def test_run_ahead_with_arrivals_to_come(monkeypatch):
    """Serving a workload whose next request is still to arrive (Engine.run's `until`), iterations run
    ahead within the time left before it, and the outputs are those of run_ahead=False."""
    from moejax.engine.engine import Arrival, Engine

    bounded = []  # (until, steps an iteration run ahead may take)
    decode_steps = Engine._decode_steps

    def spy(self, until, after=0):
        steps = decode_steps(self, until, after)
        if after:
            bounded.append((until, steps))
        return steps
    monkeypatch.setattr(Engine, "_decode_steps", spy)
    model = build_model(get_preset("tiny-qwen3-moe"), seed=5)
    rng = np.random.default_rng(3)
    arrivals = [Arrival(0.0, rng.integers(0, 512, n).tolist(), SamplingParams(max_tokens=40, ignore_eos=True))
                for n in (6, 3, 9)] + [Arrival(1.0, [4, 4, 2], SamplingParams(max_tokens=12, ignore_eos=True))]
    outputs = {}
    for run_ahead in (False, True):
        engine = build(model, max_model_len=64, block_size=4, num_blocks=128, max_decode_steps=4, run_ahead=run_ahead)
        outputs[run_ahead] = [r.output_token_ids for r in engine.run(arrivals)]
    assert outputs[True] == outputs[False] and all(len(t) for t in outputs[True])
    assert any(until is not None and steps > 1 for until, steps in bounded), bounded


def test_abort_while_an_iteration_runs_ahead():
    """Aborting every request while the iteration after the current one is already dispatched drops
    it; its writes into the freed blocks change nothing for the requests served next."""
    model = build_model(get_preset("tiny-qwen3-moe"), seed=5)
    prompts, later = [[5, 9, 13, 2, 7], [3, 3, 8]], [[11, 4, 6, 1]]
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    (fresh,), _, _ = serve(model, later, [params], 4)
    engine = build(model, max_model_len=64, block_size=4, num_blocks=16, max_decode_steps=4)  # blocks reused
    first = [engine.add_request(p, params) for p in prompts]
    while engine._ahead is None:
        engine.step()
    for r in first:
        engine.abort(r.request_id)
    req = engine.add_request(later[0], params)
    while engine.has_unfinished:
        engine.step()
    assert [r.finish_reason for r in first] == ["abort"] * 2
    assert req.output_token_ids == fresh.output_token_ids
    assert engine.scheduler.kv.num_free_blocks == engine.scheduler.kv.num_blocks


def test_iterations_bounded_by_max_iteration_s():
    """Once a step time is measured, a multi-step iteration runs no more steps than fit in
    max_iteration_s (at least one); the tokens do not change."""
    model = build_model(get_preset("tiny-qwen3-moe"), seed=5)
    prompts, params = [[5, 9, 13, 2, 7], [3, 3, 8]], [SamplingParams(max_tokens=20, ignore_eos=True)] * 2
    free, _, _ = serve(model, prompts, params, 1)
    bounded, plans, _ = serve(model, prompts, params, 8, max_iteration_s=0.0, run_ahead=False)
    assert [r.output_token_ids for r in bounded] == [r.output_token_ids for r in free]
    steps = [p.plan.decode_steps for p in plans if not p.plan.num_prefill_tokens]
    assert steps[0] == 8 and set(steps[1:]) == {1}  # the first, unmeasured, runs the executor's most


def test_stop_tokens_inside_a_multi_step_iteration():
    model = build_model(get_preset("tiny-qwen3-moe"), seed=5)
    prompt = [5, 9, 13, 2, 7]
    free, _, _ = serve(model, [prompt], [SamplingParams(max_tokens=24, ignore_eos=True)], 1)
    tokens = free[0].output_token_ids
    stop = tokens[5]
    first = tokens.index(stop)
    (req,), plans, _ = serve(model, [prompt], [SamplingParams(max_tokens=24, stop_token_ids=(stop,))], 8)
    assert req.output_token_ids == tokens[:first + 1] and req.finish_reason == "stop"
    assert any(p.plan.decode_steps == 8 for p in plans)


def test_streaming_and_abort_at_iteration_granularity():
    """A stream delivers each iteration's tokens at once (up to max_decode_steps per delta); an abort
    takes effect between iterations: the request keeps what was delivered and ends with 'abort'."""
    from moejax import LLM

    llm = LLM("tiny-qwen3-moe", seed=5, max_model_len=64, block_size=4, max_decode_steps=4)
    deltas = []
    for delta in llm.stream([[5, 9, 13, 2, 7], [3, 3, 8]], SamplingParams(max_tokens=30, ignore_eos=True)):
        deltas.append(delta)
        if delta.request_id == 0 and len(deltas) == 3:
            llm.abort(0)
    by_request = {rid: [d for d in deltas if d.request_id == rid] for rid in (0, 1)}
    assert max(len(d.token_ids) for d in deltas) == 4  # a multi-step iteration's worth
    assert by_request[0][-1].finished and by_request[0][-1].finish_reason == "abort"
    assert sum(len(d.token_ids) for d in by_request[0]) < 30
    assert sum(len(d.token_ids) for d in by_request[1]) == 30 and by_request[1][-1].finish_reason == "length"


def test_warmup_compiles_what_serving_meets():
    """After Engine.warmup, requests of any count and length within the limits compile nothing, and
    the warm-up leaves no trace (no steps, no finished requests, ids from 0)."""
    from moejax.engine.compiles import count_compilations

    model = build_model(get_preset("tiny-qwen3-moe"), seed=5)
    engine = build(model, max_model_len=64, block_size=4, num_blocks=256, max_num_seqs=8, token_budget=32,
                   max_decode_steps=4)
    assert engine.warmup() > 0
    assert not engine.steps and not engine.finished
    rng = np.random.default_rng(7)
    with count_compilations() as compiled:
        for batch in (1, 3, 8):
            for _ in range(batch):
                prompt = rng.integers(0, model.config.vocab_size, int(rng.integers(1, 40))).tolist()
                engine.add_request(prompt, SamplingParams(max_tokens=int(rng.integers(1, 12)), ignore_eos=True))
            while engine.has_unfinished:
                engine.step()
    assert compiled.count == 0
    assert sorted(r.request_id for r in engine.finished) == list(range(12))


def test_second_generate_of_a_loaded_checkpoint_compiles_nothing(tmp_path):
    """A checkpoint's parameters are committed to a device, so every program's outputs are: the KV
    cache must be committed from the start too, or the first prefill's program (keyed on a fresh,
    uncommitted cache) compiles again in the next call, once the cache is a program's output."""
    from moejax import LLM
    from moejax.checkpoint import save_model

    save_model(build_model(get_preset("tiny-qwen3-moe"), seed=5), tmp_path / "ckpt")
    llm = LLM(str(tmp_path / "ckpt"), max_model_len=64, block_size=4, num_blocks=64, max_decode_steps=4)
    prompt = [np.random.default_rng(0).integers(0, 512, 12).tolist()]
    params = SamplingParams(max_tokens=17, ignore_eos=True)  # a prefill, then only multi-step decodes
    first = llm.generate(prompt, params)[0].token_ids
    assert llm.generate(prompt, params)[0].token_ids == first
    assert llm.last_stats["compilations"] == 0, llm.last_stats


def test_run_ahead_meets_the_same_decode_program(tmp_path):
    """Token ids taken on the device from the iteration run ahead of, and token ids from the host,
    reach the multi-step program in one placement: one compiled decode program, also for a
    checkpoint's committed parameters (whose programs' outputs are committed)."""
    from moejax import LLM
    from moejax.checkpoint import save_model

    save_model(build_model(get_preset("tiny-qwen3-moe"), seed=5), tmp_path / "ckpt")
    llm = LLM(str(tmp_path / "ckpt"), max_model_len=64, block_size=4, num_blocks=64, max_decode_steps=4)
    llm.generate([[5, 9, 13, 2, 7]], SamplingParams(max_tokens=30, ignore_eos=True))  # several iterations ahead
    decode = [fn for key, fn in llm.model._fns.items() if key[0] == "decode_steps"]
    assert len(decode) == 1 and decode[0]._cache_size() == 1


def test_identical_second_generate_compiles_nothing_at_any_batch():
    """A user's identical second `generate` compiles nothing, at every batch size of one LLM: one
    request, a few, and more than the KV cache holds at once (multi-step iterations cut short by
    free blocks, preemptions): no program's shape may hang on free blocks, K or the engine's history."""
    from moejax import LLM

    llm = LLM("tiny-qwen3-moe", seed=5, max_model_len=64, block_size=4, num_blocks=40, max_num_seqs=16,
              max_decode_steps=4)
    rng = np.random.default_rng()
    for batch in (1, 5, 12):
        prompts = [rng.integers(0, 512, int(rng.integers(2, 20))).tolist() for _ in range(batch)]
        params = SamplingParams(max_tokens=int(rng.integers(10, 30)), ignore_eos=True)
        first = [o.token_ids for o in llm.generate(prompts, params)]
        assert [o.token_ids for o in llm.generate(prompts, params)] == first
        assert llm.last_stats["compilations"] == 0, (batch, llm.last_stats)
    assert sum(r.num_preemptions for r in llm.engine.finished) > 0  # the cache ran short at 12
