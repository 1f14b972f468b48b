"""DisaggExecutor: attention and routed experts on disjoint device pools (Janus, arXiv 2512.13525;
micro-batch ping-pong from MegaScale-Infer, arXiv 2504.02263). build(model, "disagg", layout=
"cpu8-attn4-exp4", micro_batches=None | m, exchange="auto" | "direct" | "two_phase", replicas=None |
"auto" | per-instance expert lists, expert_slots=S, activation_policy="janus" | "token").

The attention pool holds the attention side and the KV cache (data-parallel over requests), the
expert pool the routed experts (expert-parallel). One program cannot span two disjoint meshes, so
each MoE layer runs in its steps, in the layer loop of moejax.disagg.pingpong (fuse=False: also one
decode step per plan, multi-step decode does not apply):

    attend + route            attention pool
    rows, ids, weights  ->    expert pool   (moejax.disagg.exchange: direct or two-phase)
    schedule                  expert pool   (moejax.disagg.replicas: the replica of each activated
                                             expert, chosen by the activation scheduler -> slot map)
    routed experts            expert pool   (each MoE instance's slot buffer)
    outputs             ->    attention pool
    combine                   attention pool

A layer group's rows are split by request into m micro-batches, dispatched so that micro-batch j's
experts run while micro-batch j+1 attends (per micro-batch: combine of the previous layer, attend,
route, exchange, experts; nothing waits on the host). m comes from the cost model's attention and
expert seconds for the step (microbatch.choose_micro_batches) unless given.

Over several processes (moejax.launch) each pool spans every process and a move is one resharding
program over both pools' devices, waited for on the host (exchange.Exchange._union_move): correct,
but there the pools do not overlap. Experts in a process of their own: moejax.disagg.remote.

Greedy outputs equal the colocated executor's: every row sees the same operations on the same
weights, only where they run changes. Step results carry the exchange's bytes and messages and the
pools' busy fractions (moejax.disagg.timeline) in `extra`, and the balance over the MoE instances
(distinct activated experts and tokens per instance, max and mean over instances, averaged over the
step's scheduled layers: each MoE layer of each micro-batch). Those are computed on the expert pool
and read once per step, after it, with the pools' busy times: nothing in the layer loop waits on
the host.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np

from moejax.config import ModelConfig
from moejax.disagg.exchange import FORMS, HOST_NETWORK, Exchange, host_map, seconds
from moejax.disagg.microbatch import choose_micro_batches
from moejax.disagg.pingpong import PingPongExecutor
from moejax.disagg.replicas import ExpertReplicas, copied_slots
from moejax.engine.jax_executor import kv_blocks_for
from moejax.engine.kv_cache import state_slots_for
from moejax.engine.metadata import bucket
from moejax.engine.plan import IterationPlan, StepResult
from moejax.engine.traffic import layer_stats
from moejax.meshes import LayoutError
from moejax.meshes.placement import Placements
from moejax.models.model import Model
from moejax.sim.cost_model import ATTENTION_KERNELS, CostModel
from moejax.sim.hardware import get_hardware

MOST_MICRO_BATCHES = 3
# step metrics a run sums (the first four also per step in its summary)
SUMMED = ("exchange_bytes", "exchange_messages", "exchange_cross_host_bytes", "exchange_cross_host_messages",
          "attention_busy_s", "expert_busy_s", "exchange_busy_s", "pool_overlap_s", "pools_wall_s")
# per-step balance over the MoE instances (moejax.disagg.replicas), each averaged over the step's layers
BALANCE = ("distinct_experts_max", "distinct_experts_mean", "instance_tokens_max", "instance_tokens_mean")


class DisaggExecutor(PingPongExecutor):
    splits_experts = True  # the one executor that runs an attention/experts split layout

    def __init__(self, model: Model, num_blocks, block_size: int, max_model_len: int, *,
                 micro_batches: int | None = None, exchange: str = "auto", emulated_hosts: int | None = None,
                 hardware: str = "h100x8", state_slots: int = 0, replicas=None, expert_slots: int | None = None,
                 expert_load=None, activation_policy: str = "janus"):
        """micro_batches: m per layer group (None: from the cost model of `hardware`); exchange: the
        activation exchange's form, or "auto" (the cheaper by the cost model, per step);
        emulated_hosts: treat each pool's devices as that many hosts (one process); replicas,
        expert_slots, expert_load: the experts each MoE instance holds (moejax.disagg.replicas);
        activation_policy: how a replica is chosen per layer and step ("janus" or "token")."""
        p = model.placements
        if p.colocated:
            raise LayoutError(f"executor 'disagg' runs attention and experts on disjoint devices; {model.config.name} "
                              "is colocated: load it with an attention/experts split layout, e.g. "
                              "layout='cpu8-attn4-exp4' (or use executor 'jax')")
        if micro_batches is not None and (isinstance(micro_batches, bool) or not isinstance(micro_batches, int)
                                          or micro_batches < 1):
            raise ValueError(f"micro_batches={micro_batches!r}: must be an integer >= 1 (or None: chosen per step)")
        if exchange not in ("auto", *FORMS):
            raise ValueError(f"exchange={exchange!r}: expected auto, {', '.join(FORMS)}")
        super().__init__(model, num_blocks, block_size, max_model_len, state_slots=state_slots)
        self.micro_batches, self.form = micro_batches, exchange
        self.replicas = ExpertReplicas(model, replicas, expert_slots, expert_load, activation_policy)
        self.cost = CostModel(model.config, get_hardware(hardware))
        self.exchange = Exchange(host_map({"attention": list(p.attention.mesh.devices.flat),
                                           "experts": list(p.experts.mesh.devices.flat)}, emulated_hosts))
        self._to_experts = p.experts.sharding(())  # rows replicated over the expert pool
        self._to_attention = p.attention.sharding(("batch", None))
        self._step_form = "direct"
        self._balance: list[tuple[jax.Array, jax.Array]] = []  # per scheduled layer: (distinct [N], tokens [N])
        self.totals: dict[str, float] = {}

    # --- one step -------------------------------------------------------------------------------------
    def execute(self, plan: IterationPlan) -> StepResult:
        if plan.slices:
            self.step_micro_batches, self._step_form = self.choose(plan)
        result = super().execute(plan)
        pools, sent = self.finish_pools(), self.exchange.take()
        result.extra.update(**pools, exchange_form=self._step_form,
                            exchange_bytes=sent.bytes, exchange_messages=sent.messages,
                            exchange_cross_host_bytes=sent.cross_host_bytes,
                            exchange_cross_host_messages=sent.cross_host_messages, **self._take_balance())
        if plan.slices:
            for k in SUMMED:
                self.totals[k] = self.totals.get(k, 0) + result.extra[k]
            self.totals["steps"] = self.totals.get("steps", 0) + 1
            if result.extra["scheduled_layers"]:
                for k in BALANCE:
                    self.totals[k] = self.totals.get(k, 0) + result.extra[k]
                self.totals["balanced_steps"] = self.totals.get("balanced_steps", 0) + 1
        return result

    def _take_balance(self) -> dict:
        """The step's per-instance balance (one host read, after the step): distinct activated experts and
        tokens per MoE instance, max and mean over instances, averaged over the scheduled layers (each
        MoE layer of each micro-batch)."""
        if not self._balance:
            return {"scheduled_layers": 0, **dict.fromkeys(BALANCE, 0.0)}
        distinct, tokens = (np.asarray(a, float) for a in jax.device_get(tuple(map(jnp.stack, zip(*self._balance)))))
        self._balance = []
        return {"scheduled_layers": len(distinct),
                "distinct_experts_max": float(distinct.max(axis=1).mean()),
                "distinct_experts_mean": float(distinct.mean()),
                "instance_tokens_max": float(tokens.max(axis=1).mean()), "instance_tokens_mean": float(tokens.mean())}

    def disagg_summary(self) -> dict:
        """The run's exchange and pool metrics (moejax.runs puts them in the run JSON): totals, per-step
        means of bytes and messages, and busy fractions over the steps' measured wall time."""
        t, steps = self.totals, max(self.totals.get("steps", 0), 1)
        wall = t.get("pools_wall_s", 0.0) or 1.0
        balanced = max(t.get("balanced_steps", 0), 1)
        return {**{k: t.get(k, 0) for k in ("steps", *SUMMED)},
                **{f"{k}_per_step": t.get(k, 0) / steps for k in SUMMED[:4]},
                **{k: t.get(k, 0) / balanced for k in BALANCE},  # per instance, averaged over the steps
                "moe_instances": self.replicas.num_instances, "expert_slots": self.replicas.slots,
                "activation_policy": self.replicas.policy,
                "attention_busy": t.get("attention_busy_s", 0.0) / wall,
                "expert_busy": t.get("expert_busy_s", 0.0) / wall,
                "pool_overlap": t.get("pool_overlap_s", 0.0) / wall,
                "micro_batches": self.micro_batches, "exchange": self.form}

    def choose(self, plan: IterationPlan) -> tuple[int, str]:
        """(micro-batches, exchange form) for a plan: given, or the cost model's pick. Attention and
        experts seconds are the plan's priced attention block and FFN; a micro-batch costs its kernel
        launches and one exchange's message latencies again."""
        cfg, hw = self.config, self.cost.hw
        T = plan.num_tokens
        forms = {f: self.exchange_plan_seconds(T, f) for f in FORMS}
        form = min(forms, key=forms.get) if self.form == "auto" else self.form
        if self.micro_batches is not None:
            return self.micro_batches, form
        priced = self.cost.price(plan, layer_stats(cfg, plan, distinct_experts=np.full(
            cfg.num_layers, min(cfg.num_experts, T * cfg.num_experts_per_tok))))
        messages = forms[form][1]
        per_batch = cfg.num_layers * (self.cost.calibration.kernel_overhead_s * ATTENTION_KERNELS
                                      + messages * min(hw.interconnect.latency_s, HOST_NETWORK.latency_s))
        m = choose_micro_batches(float(priced.attn_s.sum()), float(priced.ffn_s.sum()), per_batch,
                                 min(MOST_MICRO_BATCHES, len(plan.slices)))
        return m, form

    def exchange_plan_seconds(self, tokens: int, form: str) -> tuple[float, int]:
        """(modelled seconds, messages) of one layer's exchange of `tokens` rows both ways by `form`."""
        cfg = self.config
        T = bucket(-(-tokens // self.row_shards)) * self.row_shards  # rows as the row map pads them
        there = self.exchange.plan_for((T, cfg.hidden_size), self._to_attention, self._to_experts, form)
        back = self.exchange.plan_for((T, cfg.hidden_size), self._to_experts, self._to_attention, form)
        row_out = cfg.hidden_size * cfg.dtype_bytes
        row_in = row_out + 8 * cfg.num_experts_per_tok  # + ids (int32) and weights (fp32)
        intra = self.cost.hw.interconnect
        return (seconds(there, row_in, intra) + seconds(back, row_out, intra), len(there) + len(back))

    # --- where the experts run (PingPongExecutor's layer loop) ------------------------------------------
    def send_experts(self, i: int, y: jax.Array, ids: jax.Array, weights: jax.Array, routed_at: int):
        sent = self.exchange.deliver((y, ids, weights), self._to_experts, self._step_form)
        sent_at = self.timeline.add("exchange", sent, (routed_at,))
        routed, tokens, distinct, load = self.replicas.run(i, *sent)  # schedule + experts, one program
        self._balance.append((distinct, load))
        experts_at = self.timeline.add("experts", routed, (sent_at,))
        back = self.exchange.deliver((routed,), self._to_attention, self._step_form,
                                     held_as=self._to_experts)[0]  # every expert device has all rows
        return (back, self.timeline.add("exchange", back, (experts_at,))), tokens

    def expert_output(self, handle):
        back, back_at = handle
        return back, (back_at,)


# --- construction (moejax.engine.build(..., "disagg")) -------------------------------------------------

def routed_expert_bytes_per_device(cfg: ModelConfig, placements: Placements, copied: int = 0) -> int:
    """Bytes of routed-expert weights on each device of the expert pool: the model's experts split
    evenly, plus `copied` expert slots of replica buffers (moejax.disagg.replicas.copied_slots)."""
    per_expert = cfg.expert_params() * cfg.dtype_bytes
    return sum(cfg.moe_layers) * cfg.num_experts * per_expert // placements.experts.shards("expert") + copied * per_expert


def device_memory_bytes(device) -> int | None:
    """What one device can hold: its memory limit, or (CPU devices share the host) the host's
    available memory split over this process's devices."""
    stats = device.memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    if device.platform == "cpu":
        from moejax.checkpoint import _host_available_bytes

        free = _host_available_bytes()
        return None if free is None else free // len(jax.local_devices())
    return None


def check_expert_pool(cfg: ModelConfig, placements: Placements, memory_bytes: int | None = None, *,
                      replicas=None, expert_slots: int | None = None, expert_load=None) -> None:
    """Refuse an expert pool whose devices cannot hold their share of the routed experts and the
    replica slots the options copy beside them (memory_bytes: per device; default what this
    process's first device of the pool has). Bad replica options raise here, before any loading."""
    copied = copied_slots(cfg.num_experts, placements.experts.shards("expert"), sum(cfg.moe_layers), replicas,
                          expert_slots, expert_load)
    own, need = (routed_expert_bytes_per_device(cfg, placements, n) for n in (0, copied))
    mine = [d for d in placements.experts.mesh.devices.flat if d.process_index == jax.process_index()]
    have = memory_bytes if memory_bytes is not None else device_memory_bytes(mine[0])
    if have is not None and need > have:
        layout = placements.experts.layout
        of_replicas = f" ({(need - own) / 2**30:.3g} GiB of them replica slots)" if copied else ""
        raise LayoutError(f"the expert pool of layout part {layout.name!r} ({placements.experts.mesh.size} devices, "
                          f"experts split {placements.experts.shards('expert')} ways) needs {need / 2**30:.3g} GiB "
                          f"of routed experts per device{of_replicas} for {cfg.name} ({cfg.dtype}), but a device "
                          f"holds {have / 2**30:.3g} GiB: give the expert pool more devices"
                          + (" or fewer expert_slots" if copied else ""))


def create(model, *, max_num_seqs: int, max_model_len: int | None, block_size: int, seed: int = 0,
           layout="cpu8-attn4-exp4", dtype: str | None = None, num_blocks: int | None = None,
           kv_budget_bytes: int | None = None, micro_batches: int | None = None, exchange: str = "auto",
           emulated_hosts: int | None = None, hardware: str = "h100x8", device_memory: int | None = None,
           state_slots: int | None = None, replicas=None, expert_slots: int | None = None, expert_load=None,
           activation_policy: str = "janus"):
    """A DisaggExecutor for `model` (a Model loaded with a split layout, or a preset / checkpoint name
    loaded here with `layout`). device_memory: bytes per expert-pool device (default: measured);
    state_slots: as the jax executor's (Gated DeltaNet layers; default one per request)."""
    from moejax.checkpoint import checkpoint_dir, load_model, placements_for
    from moejax.config import PRESETS, load_hf_config
    from moejax.engine.factory import Built

    pool = dict(replicas=replicas, expert_slots=expert_slots, expert_load=expert_load)
    if isinstance(model, Model):
        if dtype is not None:
            raise ValueError("dtype applies when loading a model by name; this Model is loaded already")
    else:  # refuse an expert pool too small before loading anything
        placements = placements_for(layout)
        if placements.colocated:
            raise LayoutError(f"executor 'disagg' needs an attention/experts split layout; {layout!r} places both "
                              "on one mesh (e.g. layout='cpu8-attn4-exp4')")
        path = None if model in PRESETS else checkpoint_dir(model)
        cfg = PRESETS[model] if path is None and model in PRESETS else \
            load_hf_config(path) if path is not None and (path / "config.json").is_file() else None
        if cfg is not None:
            check_expert_pool(cfg.replace(dtype=dtype) if dtype else cfg, placements, device_memory, **pool)
        model = load_model(model, layout=layout, dtype=dtype, seed=seed)[0]
    if not model.placements.colocated:  # (a colocated model: the executor names the fix)
        check_expert_pool(model.config, model.placements, device_memory, **pool)
    max_model_len = max_model_len or min(model.config.max_position, 4096)
    state_slots = state_slots_for(model.config, max_num_seqs, state_slots)
    num_blocks, shards = kv_blocks_for(model, max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                                       block_size=block_size, num_blocks=num_blocks, kv_budget_bytes=kv_budget_bytes,
                                       state_slots=state_slots)
    executor = DisaggExecutor(model, num_blocks, block_size, max_model_len, micro_batches=micro_batches,
                              exchange=exchange, emulated_hosts=emulated_hosts, hardware=hardware,
                              state_slots=state_slots, replicas=replicas, expert_slots=expert_slots,
                              expert_load=expert_load, activation_policy=activation_policy)
    return Built(executor, num_blocks, max_model_len, kv_shards=shards, state_slots=state_slots)

