"""One way to build an engine, whatever runs it:

    build("tiny-qwen3-moe", policy="layered")                                    # the model, for real
    build(model, "jax", layout=..., num_blocks=...)                              # a loaded Model
    build("qwen3-30b-a3b", "sim", hardware="h100x2", policy="layered-adaptive")  # on a cost model

An executor is registered by name with a factory (`register_executor`), named "module:function" so
that its package is imported only when used. A factory gets the model (a Model, a preset or
checkpoint name, or a ModelConfig) and the scheduler's sizes, resolves what it needs, and returns the
executor with the KV capacity it sized (`Built`). Once the policy exists, `executor.attach(policy)`
lets the executor take from it what it needs (the JAX executor: how many hidden rows the policy
keeps between iterations).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass

from moejax.engine.engine import MAX_ITERATION_S, Engine
from moejax.engine.executor import Executor
from moejax.engine.kv_cache import KVCacheManager, kv_groups
from moejax.engine.layered import WithinTarget
from moejax.engine.policies import make_policy, parse_policy, policy_options
from moejax.engine.scheduler import Scheduler, SchedulerConfig


@dataclass
class Built:
    """What an executor factory returns."""

    executor: Executor
    num_blocks: int | tuple[int, ...]  # KV blocks the executor holds: per KV group (kv_cache.kv_groups), or one count
    max_model_len: int  # as the caller gave it, or the executor's default
    kv_shards: int = 1  # request shards the blocks are split over (data parallelism)
    state_slots: int = 0  # per-request state slots the executor holds (models with Gated DeltaNet layers)
    virtual_time: bool = False  # the executor models time instead of taking it


Factory = Callable[..., Built]

EXECUTORS: dict[str, str | Factory] = {
    "jax": "moejax.engine.jax_executor:create",
    "sim": "moejax.sim.executor:create",
    "offload": "moejax.offload.executor:create",  # routed experts in host memory, a device expert cache
    "sim-offload": "moejax.offload.sim:create",  # the same, priced on a cost model's host link
    "disagg": "moejax.disagg.executor:create",  # attention and routed experts on disjoint device pools
    "remote-experts": "moejax.disagg.remote:create",  # routed experts in a process of their own
}


def register_executor(name: str, factory: str | Factory) -> None:
    """Make `build(..., executor=name)` use `factory` ("package.module:function" or a callable)."""
    EXECUTORS[name] = factory


def _factory(name: str) -> Factory:
    if name not in EXECUTORS:
        raise ValueError(f"unknown executor {name!r}; executors: {', '.join(EXECUTORS)}")
    factory = EXECUTORS[name]
    if isinstance(factory, str):
        module, _, attr = factory.partition(":")
        factory = EXECUTORS[name] = getattr(importlib.import_module(module), attr)
    return factory


def build(model, executor: str = "jax", *, policy: str = "chunked", token_budget: int = 512, max_num_seqs: int = 256,
          max_model_len: int | None = None, block_size: int = 16, seed: int = 0, run_ahead: bool = True,
          max_iteration_s: float = MAX_ITERATION_S, **options) -> Engine:
    """An engine serving `model` on `executor` with a scheduling policy ("name" or "name@token_budget").

    Other options go to the policy (layered: group_table, cohorts_in_flight, max_prefill_tokens, ...;
    layered-adaptive also tbt_target_s, and prices iterations with the executor's cost model) or to
    the executor's factory (jax: layout, dtype, num_blocks, kv_budget_bytes, state_slots, fuse,
    max_decode_steps; sim: hardware, routing, routing_params, calibration, memory_fraction, state_slots;
    offload / sim-offload: theirs, state_slots too); an option neither takes is an error. state_slots:
    per-request state slots of Gated DeltaNet layers (Qwen3-Next), default one per max_num_seqs.
    run_ahead: dispatch the next multi-step decode iteration before the last one's tokens are back
    (Engine.step). max_iteration_s: the longest a multi-step decode iteration is planned to take
    (Engine.step)."""
    name, overrides = parse_policy(policy)
    token_budget = overrides.get("token_budget", token_budget)
    for field, value, least in (("token_budget", token_budget, 1), ("max_num_seqs", max_num_seqs, 1),
                                ("block_size", block_size, 1), ("max_model_len", max_model_len or 2, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{field}={value!r}: must be an integer >= {least}")
    if isinstance(max_iteration_s, bool) or not isinstance(max_iteration_s, (int, float)) or not max_iteration_s >= 0:
        raise ValueError(f"max_iteration_s={max_iteration_s!r}: must be a number of seconds >= 0")
    factory = _factory(executor)
    executor_takes = set(inspect.signature(factory).parameters) - set(_SIZES)
    policy_takes = policy_options(name) | ({"tbt_target_s"} if name == "layered-adaptive" else set())
    unknown = sorted(set(options) - executor_takes - policy_takes)
    if unknown:
        raise ValueError(f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}: policy {name!r} "
                         f"takes {', '.join(sorted(policy_takes)) or 'none'}; executor {executor!r} takes "
                         f"{', '.join(sorted(executor_takes))}")
    built = factory(model, max_num_seqs=max_num_seqs, max_model_len=max_model_len, block_size=block_size, seed=seed,
                    **{k: v for k, v in options.items() if k in executor_takes})
    chosen_options = {k: v for k, v in options.items() if k in policy_takes}
    if name == "layered-adaptive":
        target_s = chosen_options.pop("tbt_target_s", 0.1)
        if "choose_layers" not in chosen_options:
            if built.executor.pricer is None:
                raise ValueError(f"policy 'layered-adaptive' needs a cost model to keep iterations within a TBT "
                                 f"target; executor {executor!r} has none: simulate (executor 'sim', hardware=...) "
                                 "or pass choose_layers=WithinTarget(...)")
            chosen_options["choose_layers"] = WithinTarget(built.executor.pricer, target_s=target_s)
    chosen = make_policy(name, **chosen_options)
    built.executor.attach(chosen)
    windows = [g.window for g in kv_groups(built.executor.config)]
    kv = KVCacheManager(built.num_blocks, block_size, num_shards=built.kv_shards, windows=windows,
                        num_state_slots=built.state_slots)
    scheduler = Scheduler(built.executor.config, kv, chosen, SchedulerConfig(
        max_num_seqs=max_num_seqs, token_budget=token_budget, max_model_len=built.max_model_len))
    return Engine(scheduler, built.executor, virtual_time=built.virtual_time, seed=seed, run_ahead=run_ahead,
                  max_iteration_s=max_iteration_s)


_SIZES = ("model", "max_num_seqs", "max_model_len", "block_size", "seed")  # what build passes every factory
