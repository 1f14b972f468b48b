"""Scheduling policies: which slices run in the next iteration.

    chunked   (Sarathi-Serve) decode first, then fill the token budget with prompt chunks
    no_chunk  (vLLM v0 style) whole prompts first in prefill-only iterations, else a decode iteration

    layered   (Lee et al.) decode first, then whole prompts crossing one layer group per iteration
              (moejax.engine.layered)
"""

from __future__ import annotations

import inspect

from moejax.engine.layered import LayeredPrefill
from moejax.engine.plan import RowSlice
from moejax.engine.request import Status
from moejax.engine.scheduler import Scheduler


class ChunkedPrefill:
    name = "chunked"

    def schedule(self, s: Scheduler) -> list[RowSlice]:
        slices, budget = s.decodes(s.config.token_budget)
        for req in list(s.running):  # prompts already under way
            if budget == 0:
                break
            # num_uncomputed inlined: this runs for every running request, mostly decodes (one token)
            if len(req.token_ids) - req.num_computed_tokens > 1 and req.status is Status.RUNNING \
                    and not s.is_scheduled(req):
                n = min(req.num_uncomputed, budget)
                if s.reserve(req, n):
                    slices.append(s.make_slice(req, n))
                    budget -= n
        return slices + [s.make_slice(req, n) for req, n in s.admit(budget)]

    def forget(self, request_id: int) -> None:
        pass

    def max_kept_rows(self, max_model_len: int) -> int:
        return 0


class NoChunk(ChunkedPrefill):
    """Prefill-prioritising: whole prompts (up to the token budget; the first one even if longer)."""

    name = "no_chunk"

    def schedule(self, s: Scheduler) -> list[RowSlice]:
        prompts = s.admit(s.config.token_budget, whole_prompts=True)
        if prompts:
            return [s.make_slice(req, n) for req, n in prompts]
        return s.decodes(s.config.max_num_seqs)[0]


def _layered_adaptive(choose_layers=None, **kwargs) -> LayeredPrefill:
    if choose_layers is None:
        raise ValueError("policy 'layered-adaptive' needs a cost model to keep iterations within a TBT target: "
                         "simulate (moejax simulate / runs.run(hardware=...)) or pass choose_layers=WithinTarget(...)")
    return LayeredPrefill(choose_layers=choose_layers, name="layered-adaptive", **kwargs)


POLICIES = {"chunked": ChunkedPrefill, "no_chunk": NoChunk, "layered": LayeredPrefill,
            "layered-adaptive": _layered_adaptive}


def parse_policy(spec: str) -> tuple[str, dict]:
    """'chunked@256' -> ('chunked', {'token_budget': 256})."""
    name, _, budget = spec.partition("@")
    if not budget:
        return name, {}
    try:
        value = int(budget)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"policy {spec!r}: expected name@<token budget>, a positive integer, e.g. chunked@256")
    return name, {"token_budget": value}


def policy_options(name: str) -> set[str]:
    """The options a policy takes (chunked and no_chunk: none)."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; policies: {', '.join(POLICIES)}")
    if not name.startswith("layered"):
        return set()
    return set(inspect.signature(LayeredPrefill).parameters) - {"_cohorts", "name"}


def make_policy(name: str, **options):
    unknown = sorted(set(options) - policy_options(name))
    if unknown:
        known = policy_options(name)
        raise ValueError(f"policy {name!r} takes no option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}"
                         + (f" (its options: {', '.join(sorted(known))})" if known else ""))
    return POLICIES[name](**options)
