"""The serving engine: requests, paged KV bookkeeping, scheduler + policies, iteration plans, executors.

    engine = moejax.engine.build("tiny-qwen3-moe", "jax", policy="layered")
    engine = moejax.engine.build("qwen3-30b-a3b", "sim", hardware="h100x2")
"""

from moejax.engine.factory import EXECUTORS, build, register_executor

__all__ = ["EXECUTORS", "build", "register_executor"]
