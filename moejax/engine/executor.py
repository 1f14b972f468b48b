"""The executor interface: an IterationPlan in, a StepResult out.

    JaxExecutor   runs the model on one device mesh (moejax.engine.jax_executor)
    SimExecutor   a roofline cost model, no model at all (moejax.sim.executor)

Executors are where placement lives; the scheduler and engine loop never see devices. They are
built by name through moejax.engine.build (moejax.engine.factory).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from moejax.config import ModelConfig
from moejax.engine.kv_transfer import KVPayload
from moejax.engine.plan import IterationPlan, StepResult


class Executor(Protocol):
    config: ModelConfig
    kv_dtype: object  # dtype of the KV it holds (what imported KV must have)
    pricer: Callable[[IterationPlan], float] | None  # modelled seconds of a plan, if it has a cost model
    max_decode_steps: int  # the most decode steps it runs for one decode-only plan (1: one per plan)

    def attach(self, policy) -> None:
        """Called once with the engine's policy: take from it what this executor needs."""
        ...

    def execute(self, plan: IterationPlan) -> StepResult:
        """Run one iteration: import `plan.kv_imports`, run every slice through its layers, KV (and the
        state slots `plan.state_slots` name) written,
        sampled rows sampled, and the state of `plan.released` requests (kept hidden rows) dropped."""
        ...

    # Executors with max_decode_steps > 1 run a multi-step decode plan in two halves (the engine may
    # launch the next one, run ahead, in between): launch(plan, after=None) dispatches it without
    # waiting (after: the launched iteration whose tokens feed it), finish(launched) -> StepResult.

    def export_kv(self, block_ids: tuple[int, ...], num_tokens: int,
                  group_block_ids: tuple[tuple[int, ...], ...] = (), state_slot: int | None = None,
                  layers: range | None = None) -> KVPayload:
        """One request's KV: tokens 0 .. num_tokens-1 of the blocks `block_ids` (and for a hybrid model
        the other KV groups' tables), every layer or only `layers` (a sliding-window layer: its last
        tokens, kv_transfer.layer_kv_state; a Gated DeltaNet layer: its state slot `state_slot`)."""
        ...
