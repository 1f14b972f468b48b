"""The executor interface: an IterationPlan in, a StepResult out.

    JaxExecutor   runs the model on one device mesh (moejax.engine.jax_executor)
    SimExecutor   a roofline cost model, no model at all (moejax.sim.executor)

Executors are where placement lives; the scheduler and engine loop never see devices.
"""

from __future__ import annotations

from typing import Protocol

from moejax.config import ModelConfig
from moejax.engine.plan import IterationPlan, StepResult


class Executor(Protocol):
    config: ModelConfig

    def execute(self, plan: IterationPlan) -> StepResult:
        """Run one iteration: every slice through its layers, KV written, sampled rows sampled,
        and the state of `plan.released` requests (kept hidden rows) dropped."""
        ...
