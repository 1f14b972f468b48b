"""Scheduling policies: which slices run in the next iteration.

    chunked   (Sarathi-Serve) decode first, then fill the token budget with prompt chunks
    no_chunk  (vLLM v0 style) whole prompts first in prefill-only iterations, else a decode iteration

    layered   (Lee et al.) decode first, then whole prompts crossing one layer group per iteration
              (moejax.engine.layered)
"""

from __future__ import annotations

from moejax.engine.layered import LayeredPrefill
from moejax.engine.plan import RowSlice
from moejax.engine.request import Status
from moejax.engine.scheduler import Scheduler


class ChunkedPrefill:
    name = "chunked"

    def schedule(self, s: Scheduler) -> list[RowSlice]:
        slices, budget = s.schedule_decodes(s.config.token_budget)
        for req in list(s.running):  # prompts already under way
            if budget == 0:
                break
            if req.status is Status.RUNNING and req.num_uncomputed > 1:
                n = min(req.num_uncomputed, budget)
                if s.reserve(req, n):
                    slices.append(s.make_slice(req, n))
                    budget -= n
        while s.waiting and budget > 0 and len(s.running) < s.config.max_num_seqs:
            req = s.waiting[0]
            n = min(req.num_uncomputed, budget)
            if not s.kv.can_allocate(req, n):
                break  # new requests never preempt running ones
            s.admit(req)
            s.kv.allocate(req, n)
            slices.append(s.make_slice(req, n))
            budget -= n
        return slices

    def forget(self, request_id: int) -> None:
        pass


class NoChunk:
    """Prefill-prioritising: whole prompts (up to the token budget; the first one even if longer)."""

    name = "no_chunk"

    def schedule(self, s: Scheduler) -> list[RowSlice]:
        slices, budget = [], s.config.token_budget
        while s.waiting and len(s.running) < s.config.max_num_seqs:
            req = s.waiting[0]
            n = req.num_uncomputed
            if (slices and n > budget) or not s.kv.can_allocate(req, n):
                break
            s.admit(req)
            s.kv.allocate(req, n)
            slices.append(s.make_slice(req, n))
            budget -= n
        if slices:
            return slices
        return s.schedule_decodes(s.config.max_num_seqs)[0]

    def forget(self, request_id: int) -> None:
        pass


def _layered_adaptive(choose_layers=None, **kwargs) -> LayeredPrefill:
    if choose_layers is None:
        raise ValueError("policy 'layered-adaptive' needs a cost model to keep iterations within a TBT target: "
                         "simulate (moejax simulate / runs.run(hardware=...)) or pass choose_layers=WithinTarget(...)")
    return LayeredPrefill(choose_layers=choose_layers, name="layered-adaptive", **kwargs)


POLICIES = {"chunked": ChunkedPrefill, "no_chunk": NoChunk, "layered": LayeredPrefill,
            "layered-adaptive": _layered_adaptive}


def make_policy(name: str, **kwargs):
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; policies: {', '.join(POLICIES)}")
    return POLICIES[name](**kwargs)
