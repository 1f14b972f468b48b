"""Layered prefill (Lee et al., arXiv 2510.08055): layer groups, not token chunks, are the unit of
prefill scheduling.

A *cohort* of whole prompts is split over the model's depth: the L layers are cut into G contiguous
groups and each iteration the cohort crosses one group, fused with the decode batch (which crosses
all layers). After G iterations every prompt has crossed every layer once, so each layer's experts
are read once per prompt instead of once per chunk. Decodes are scheduled first and never stall.

    layered           fixed G (the paper's table): G from the cohort's prompt tokens (<=512 -> 1,
                      <=1024 -> 2, <=2048 -> 4, <=4096 -> 8, else 16), capped by L
    layered-adaptive  each iteration the cohort crosses as many layers as keep the modelled
                      iteration time within a TBT target (at least one): `choose_layers=WithinTarget(...)`

`cohorts_in_flight` > 1 lets a new cohort start its first group while another is part-way (the
authors' prototype keeps one in flight).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from moejax.engine.plan import IterationPlan, RowSlice, plan_of
from moejax.engine.request import Request, Status
from moejax.engine.scheduler import Scheduler

# (max prompt tokens, groups): the authors' table
GROUP_TABLE = ((512, 1), (1024, 2), (2048, 4), (4096, 8))
MAX_GROUPS = 16


def group_count(prompt_tokens: int, num_layers: int, table=GROUP_TABLE, max_groups: int = MAX_GROUPS) -> int:
    g = next((groups for limit, groups in table if prompt_tokens <= limit), max_groups)
    return min(g, num_layers)


def split_layers(num_layers: int, groups: int) -> list[int]:
    """Boundaries [0, b1, ..., L] of `groups` contiguous groups, as even as possible (array_split)."""
    return [0] + np.cumsum([len(a) for a in np.array_split(np.arange(num_layers), groups)]).tolist()


@dataclass
class Cohort:
    request_ids: list[int]
    boundaries: list[int] | None  # fixed-G cohorts: the layer cuts; adaptive ones decide per iteration
    next_layer: int = 0  # the first layer the cohort crosses next iteration
    next_group: int = 0

    @property
    def num_groups(self) -> int | None:
        return None if self.boundaries is None else len(self.boundaries) - 1


# (scheduler, decode slices, cohort's requests, first layer) -> layers to cross this iteration
LayerChooser = Callable[[Scheduler, list[RowSlice], list[Request], int], int]


@dataclass
class WithinTarget:
    """The adaptive rule: the most layers (at least one) whose modelled iteration time — this
    iteration's decodes plus the cohort crossing those layers — stays within `target_s`."""

    price: Callable[[IterationPlan], float]  # modelled seconds of a plan (e.g. moejax.sim.pricing)
    target_s: float

    def __call__(self, s: Scheduler, decodes: list[RowSlice], members: list[Request], start: int) -> int:
        L = s.num_layers

        def seconds(k: int) -> float:
            prompt = [s.make_slice(r, r.num_uncomputed, start, start + k) for r in members]
            return self.price(plan_of(s.step, decodes + prompt, L))

        lo, hi = 1, L - start  # largest k with seconds(k) <= target; time grows with k
        if seconds(hi) <= self.target_s:
            return hi
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if seconds(mid) <= self.target_s else (lo, mid - 1)
        return lo


@dataclass
class LayeredPrefill:
    max_prefill_tokens: int = 8192  # prompt tokens in one cohort
    cohorts_in_flight: int = 1
    group_table: tuple[tuple[int, int], ...] = GROUP_TABLE  # (max prompt tokens, G) rows
    max_groups: int = MAX_GROUPS  # G beyond the table
    choose_layers: LayerChooser | None = None  # None: the fixed table; else the adaptive rule
    name: str = "layered"
    _cohorts: list[Cohort] = field(default_factory=list)

    def max_kept_rows(self, max_model_len: int) -> int:
        """Prompt rows in flight at most: every cohort full (a lone prompt may exceed the budget)."""
        return self.cohorts_in_flight * max(self.max_prefill_tokens, max_model_len)

    def schedule(self, s: Scheduler) -> list[RowSlice]:
        in_cohorts = {r for c in self._cohorts for r in c.request_ids}
        slices, _ = s.decodes(s.config.max_num_seqs, skip=in_cohorts)
        L = s.num_layers
        # Cohorts under way advance by one group (members preempted meanwhile have left them).
        for cohort in list(self._cohorts):
            members = [s.requests[r] for r in cohort.request_ids if r in s.requests
                       and s.requests[r].status is Status.RUNNING]
            if not members:
                self._cohorts.remove(cohort)
                continue
            slices += self._advance(s, cohort, members, slices)
        # A new cohort may start while fewer than `cohorts_in_flight` are under way.
        if len(self._cohorts) < self.cohorts_in_flight:
            members = [req for req, _ in s.admit(self.max_prefill_tokens, whole_prompts=True)]
            if members:
                tokens = sum(r.num_uncomputed for r in members)
                boundaries = None if self.choose_layers else split_layers(
                    L, group_count(tokens, L, self.group_table, self.max_groups))
                cohort = Cohort([r.request_id for r in members], boundaries)
                self._cohorts.append(cohort)
                slices += self._advance(s, cohort, members, slices)
        return slices

    def _advance(self, s: Scheduler, cohort: Cohort, members: list[Request], decodes: list[RowSlice]) -> list[RowSlice]:
        start = cohort.next_layer
        if cohort.boundaries is not None:
            end = cohort.boundaries[cohort.next_group + 1]
        else:
            end = min(s.num_layers, start + max(1, self.choose_layers(s, decodes, members, start)))
        cohort.next_layer, cohort.next_group = end, cohort.next_group + 1
        if end == s.num_layers:
            self._cohorts.remove(cohort)
        return [s.make_slice(r, r.num_uncomputed, start, end) for r in members]

    def forget(self, request_id: int) -> None:
        for cohort in self._cohorts:
            if request_id in cohort.request_ids:
                cohort.request_ids.remove(request_id)
