"""Attention and routed experts on disjoint device pools: the executor (`build(..., "disagg")`), the
activation exchange between the pools, micro-batch ping-pong and the pools' busy time."""

from moejax.disagg.executor import DisaggExecutor, check_expert_pool

__all__ = ["DisaggExecutor", "check_expert_pool"]
