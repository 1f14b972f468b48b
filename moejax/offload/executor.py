"""OffloadExecutor: the JAX executor with every routed expert in host memory and a device cache of N
expert slots per MoE layer (build(model, "offload", device_expert_slots=N | offload_experts=F,
predictor=..., load_rule=...)).

Only `run_layers` changes: each layer runs in its steps, and between routing and the experts the
cache is made to hold what the rows need.

    attend -> route -> predictor (layer l's rows -> P for l+1, l+2)      dispatched, then one host sync
    Residency.layer_pass: hits / misses, the load scheduler's split and prefetch choice
    on-demand loads staged, then the loads this layer needs committed (the wait is the stall)
    experts on the cache through its slot map (+ the host's experts) -> combine   dispatched
    prefetches for later layers staged: they copy while this layer and the next attention compute

Greedy outputs equal the jax executor's: an expert's weights are the same bits wherever they sit,
and a layer needing more experts than its slots appends the surplus to its cache for that pass (one
kernel call, not a sum of partial calls). The host path (host_compute=True) adds two partial sums,
so it equals the device path to rounding only.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from moejax.engine.jax_executor import JaxExecutor, kv_blocks_for, resolve_model
from moejax.engine.kv_cache import state_slots_for
from moejax.engine.plan import IterationPlan, StepResult
from moejax.models.model import Model
from moejax.offload.config import OffloadConfig, offload_config
from moejax.offload.memory import DeviceExpertCache, HostExperts
from moejax.offload.predictors import Predictor, make_predictor
from moejax.offload.residency import Residency
from moejax.offload.schedule import Costs, LoadScheduler

WINDOW_EMA = 0.2  # weight of the newest measurement of a layer's prefetch window


@partial(jax.jit, static_argnums=2)
def _keep_only(ids: jax.Array, keep: jax.Array, num_experts: int) -> jax.Array:
    """ids [T, K] with experts outside `keep` [E] bool turned into padding (id E: no expert)."""
    inside = (ids >= 0) & (ids < num_experts)
    return jnp.where(inside & keep[jnp.clip(ids, 0, num_experts - 1)], ids, num_experts)


class OffloadExecutor(JaxExecutor):
    def __init__(self, model: Model, num_blocks: int | tuple[int, ...], block_size: int, max_model_len: int,
                 offload: OffloadConfig, predictor: Predictor, release_experts: bool = False, state_slots: int = 0):
        """release_experts: the model's device copies of its experts are deleted (the executor owns it).
        state_slots: per-request state slots of Gated DeltaNet layers (JaxExecutor)."""
        p = model.placements.attention
        if p is not None and p.mesh.size > 1 or not model.placements.colocated:
            raise ValueError(f"expert offload runs {model.config.name} on one device; it is placed by a layout "
                             "over several (load it without layout=)")
        # fuse=False also means one decode step per plan (max_decode_steps = 1): every MoE layer waits for
        # its routing on the host to decide loads, which a multi-step program cannot do
        super().__init__(model, num_blocks, block_size, max_model_len, fuse=False, state_slots=state_slots)
        cfg = model.config
        self.offload, self.predictor = offload, predictor
        self.host = HostExperts(model, jax.local_devices()[0], release=release_experts)
        self.cache = DeviceExpertCache(self.host, offload.slots)
        self.residency = Residency(cfg.moe_layers, cfg.num_experts, offload.slots, self.host.expert_bytes,
                                   LoadScheduler(offload.load_rule, offload.host_compute))
        self.load_s = self.host.probe_load_s()
        self.window_s = np.zeros(cfg.num_layers)  # [L] measured prefetch window after each MoE layer
        self._host_device = jax.devices("cpu")[0]
        self.host_s = self._probe_host_s() if offload.host_compute else None
        self._last_dispatch: tuple[int, float] | None = None  # (MoE layer, when its experts were dispatched)

    def costs(self) -> Costs:
        return Costs(self.load_s, self.window_s, self.host_s)

    def execute(self, plan: IterationPlan) -> StepResult:
        stats = self.residency.stats.counters
        before = stats["bytes_h2d"].sum(), stats["stall_s"].sum()
        self._last_dispatch = None  # lookahead and windows stay within an iteration
        result = super().execute(plan)
        result.extra.update(offload_bytes_h2d=float(stats["bytes_h2d"].sum() - before[0]),
                            offload_stall_s=float(stats["stall_s"].sum() - before[1]))
        return result

    def run_layers(self, x: jax.Array, meta, start: int, end: int) -> tuple[jax.Array, list]:
        model, E, N = self.model, self.config.num_experts, self.offload.slots
        counts = []
        for i in range(start, end):
            h, self.kv[i] = model.attend(i, x, self.kv[i], meta)
            y, weights, ids = model.route(i, h, meta.valid)
            if ids is None:
                x = model.combine(i, h, y, None)
                counts.append(np.zeros(max(E, 1), np.int64))
                continue
            ids_host, predictions = jax.device_get((ids, self.predictor.predict(i, h, ids, meta.valid)))
            self._measure_window(i)
            tokens = np.bincount(ids_host.reshape(-1), minlength=E + 1)[:E]  # padding rows have id E
            self.predictor.observe(i, tokens > 0)
            loads = self.residency.layer_pass(i, tokens, predictions, self.costs(), keep=self.predictor.keep(i))
            t0 = time.perf_counter()  # the stall: issuing this layer's loads and waiting for all it needs
            for e, s in loads.cached:
                self.cache.load(i, e, s)
            transient = self.cache.stage_transient(i, loads.transient)
            needed = set(self.residency.slot_of[i][tokens > 0].tolist()) - {-1}
            stall = time.perf_counter() - t0 + self.cache.commit(i, needed)
            buffer, slot_of = self.cache.buffers[i], self.residency.slot_of[i].copy()
            if transient:
                buffer, waited = self.cache.with_transient(i, transient)
                slot_of[loads.transient] = N + np.arange(len(transient))
                stall += waited
            self.residency.stats.add(i, stall_s=stall)
            if loads.host:
                on_host = np.zeros(E, bool)
                on_host[loads.host] = True
                routed = model.experts(y, _keep_only(ids, jnp.asarray(~on_host), E), weights, buffer, slot_of) + \
                    self._on_host(i, y, _keep_only(ids, jnp.asarray(on_host), E), weights, loads.host)
            else:
                routed = model.experts(y, ids, weights, buffer, slot_of)
            x = model.combine(i, h, y, routed)
            self._last_dispatch = (i, time.perf_counter())
            for m, e, s in loads.prefetch:  # after this layer's work: they copy while it computes
                self.cache.load(m, e, s)
            counts.append(tokens)
        return x, counts

    def _measure_window(self, layer: int) -> None:
        """The time since the previous MoE layer's experts were dispatched: what a prefetch for this
        layer had to arrive in."""
        if self._last_dispatch is not None:
            prev, t = self._last_dispatch
            new = time.perf_counter() - t
            self.window_s[prev] = new if not self.window_s[prev] else \
                (1 - WINDOW_EMA) * self.window_s[prev] + WINDOW_EMA * new

    def _on_host(self, layer: int, y, ids, weights, experts: list[int]) -> jax.Array:
        """The routed experts `experts` of rows y computed on the host's CPU, the result back on the device."""
        cpu = self._host_device
        slot_of = np.full(self.config.num_experts, -1, np.int32)
        slot_of[experts] = experts
        args = jax.device_put((y, ids, weights, slot_of), cpu)
        out = self.model.experts(*args[:3], self.host.stacked(layer, cpu), args[3])
        return jax.device_put(out, y.sharding)

    def _probe_host_s(self):
        """Host seconds per expert as a + b * tokens, from timing one expert at 1 and 64 tokens."""
        layer = next(iter(self.host.gate_up))
        cfg, cpu = self.config, self._host_device
        slot_of = jax.device_put(np.r_[0, np.full(cfg.num_experts - 1, -1)].astype(np.int32), cpu)
        buffer = self.host.stacked(layer, cpu)

        def seconds(n: int) -> float:
            y = jax.device_put(np.zeros((64, cfg.hidden_size), self.host.dtype), cpu)
            ids = jax.device_put(np.where(np.arange(64)[:, None] < n, 0, cfg.num_experts).repeat(
                cfg.num_experts_per_tok, 1).astype(np.int32), cpu)
            w = jax.device_put(np.ones((64, cfg.num_experts_per_tok), np.float32), cpu)
            jax.block_until_ready(self.model.experts(y, ids, w, buffer, slot_of))  # compiled
            t0 = time.perf_counter()
            jax.block_until_ready(self.model.experts(y, ids, w, buffer, slot_of))
            return time.perf_counter() - t0

        one, many = seconds(1), seconds(64)
        per_token = max(0.0, (many - one) / 63)
        return lambda tokens: one + per_token * (np.asarray(tokens) - 1)

    def offload_summary(self) -> dict:
        return {**self.residency.stats.summary(), **self.settings()}

    def settings(self) -> dict:
        o = self.offload
        return {"slots": o.slots, "num_experts": self.config.num_experts, "predictor": self.predictor.name,
                "load_rule": o.load_rule, "host_compute": o.host_compute, "lookahead": o.lookahead,
                "expert_bytes": self.host.expert_bytes, "host_memory_kind": self.host.memory_kind,
                "measured_load_s": self.load_s}


# --- construction (moejax.engine.build(..., "offload")) --------------------------------------------------

def predictor_dir(model) -> Path | None:
    """Where a model given by name keeps its trained predictor: next to its checkpoint."""
    from moejax.assets import shipped_checkpoint
    from moejax.offload.learned import PREDICTOR_DIR

    if not isinstance(model, (str, Path)):
        return None
    path = (isinstance(model, str) and shipped_checkpoint(model)) or Path(model)
    return path / PREDICTOR_DIR if path.is_dir() else None


def executor_options(offload: dict, source, owned: bool = False) -> dict:
    """build(model, "offload", ...) options for a Model loaded from `source` (a name or directory: a
    learned predictor is looked for next to it); owned: the caller hands the model over (its device
    copies of the experts are then deleted)."""
    options = dict(offload, release_experts=owned)
    if options.get("predictor") == "learned" and options.get("predictor_path") is None:
        options["predictor_path"] = predictor_dir(source)
    return options


def load_predictor(name: str, model: Model, source, lookahead: int, predictor_path=None) -> Predictor:
    trained = None
    if name == "learned":
        from moejax.offload.learned import PredictorError, TrainedPredictor

        path = predictor_path or predictor_dir(source) or predictor_dir(model.config.name)  # or shipped with it
        if path is None:
            raise PredictorError(f"predictor 'learned' for {model.config.name}: give predictor_path= (the model was "
                                 "not loaded from a checkpoint directory, so there is no predictor next to it)")
        trained = TrainedPredictor.load(path, model)
    return make_predictor(name, model, lookahead, trained)


def create(model, *, max_num_seqs: int, max_model_len: int | None, block_size: int, seed: int = 0,
           dtype: str | None = None, num_blocks: int | None = None, kv_budget_bytes: int | None = None,
           offload_experts: float | None = None, device_expert_slots: int | None = None, predictor: str = "none",
           predictor_path: str | None = None, load_rule: str = "presched", host_compute: bool = False,
           lookahead: int = 2, release_experts: bool | None = None, state_slots: int | None = None):
    """An OffloadExecutor for `model` (a Model, or a preset / checkpoint name). The cache holds
    `device_expert_slots` experts per MoE layer, or all but the fraction `offload_experts` (default
    half); predictor none | lfru | gate-ahead | learned (trained: predictor_path, default next to the
    checkpoint). release_experts: delete the model's device copies of its experts, so that they live in
    host memory only (default: when loaded here by name; a Model passed in is left as it is).
    state_slots: as the jax executor's (Gated DeltaNet layers; default one per request)."""
    from moejax.engine.factory import Built

    source = model
    model = resolve_model(model, dtype=dtype, seed=seed)
    offload = offload_config(model.config, offload_experts=offload_experts, device_expert_slots=device_expert_slots,
                             predictor=predictor, load_rule=load_rule, host_compute=host_compute, lookahead=lookahead)
    chosen = load_predictor(predictor, model, source, lookahead, predictor_path)
    max_model_len = max_model_len or min(model.config.max_position, 4096)
    state_slots = state_slots_for(model.config, max_num_seqs, state_slots)
    num_blocks, shards = kv_blocks_for(model, max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                                       block_size=block_size, num_blocks=num_blocks, kv_budget_bytes=kv_budget_bytes,
                                       state_slots=state_slots)
    release = not isinstance(source, Model) if release_experts is None else release_experts
    executor = OffloadExecutor(model, num_blocks, block_size, max_model_len, offload, chosen, release_experts=release,
                               state_slots=state_slots)
    return Built(executor, num_blocks, max_model_len, kv_shards=shards, state_slots=state_slots)
