"""When each pool was busy, measured without a host sync in the layer loop.

The executor records every dispatched piece (its pool, when it was dispatched, what it waits for);
one watcher thread per pool blocks on the pool's outputs in dispatch order and notes when each is
ready (a piece computed in another process comes with its own start and end: `add_span`). A pool
runs its pieces one after another, so a piece starts when it was dispatched, the pool's previous
piece was done and its inputs from the other pool had arrived (`after`); it is busy from then until
ready. `busy` sums those intervals per pool and the time both compute pools were
busy at once (the overlap ping-pong buys).
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field

import jax

POOLS = ("attention", "experts", "exchange")


@dataclass
class Busy:
    wall_s: float  # first dispatch -> last ready
    attention_s: float
    experts_s: float
    exchange_s: float
    overlap_s: float  # attention and experts both busy
    spans: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # pool -> busy (start, end)

    def fractions(self) -> dict[str, float]:
        w = self.wall_s or 1.0
        return {"attention_busy": self.attention_s / w, "expert_busy": self.experts_s / w,
                "pool_overlap": self.overlap_s / w}


def busy(events: list[tuple[str, float, tuple[int, ...]]], ready: list[float]) -> Busy:
    """events: (pool, dispatched at, indices of the events whose outputs it reads), in dispatch order;
    ready: when each event's output was ready."""
    if not events:
        return Busy(0.0, 0.0, 0.0, 0.0, 0.0)
    last: dict[str, float] = {}
    spans: dict[str, list[tuple[float, float]]] = {p: [] for p in POOLS}
    for (pool, dispatched, after), done in zip(events, ready):
        start = max([dispatched, last.get(pool, dispatched), *(ready[i] for i in after)])
        spans[pool].append((min(start, done), done))
        last[pool] = done
    total = {p: sum(b - a for a, b in s) for p, s in spans.items()}
    overlap = sum(max(0.0, min(b1, b2) - max(a1, a2)) for a1, b1 in spans["attention"] for a2, b2 in spans["experts"])
    return Busy(max(ready) - min(e[1] for e in events), total["attention"], total["experts"], total["exchange"],
                overlap, spans)


class Timeline:
    def __init__(self):
        self.events: list[tuple[str, float, tuple[int, ...]]] = []
        self.ready: list[float] = []
        self._queues = {p: queue.Queue() for p in POOLS}
        for q in self._queues.values():
            threading.Thread(target=self._watch, args=(q,), daemon=True).start()

    def add(self, pool: str, output, after: tuple[int, ...] = ()) -> int:
        """Record a dispatched piece whose result is `output` (any pytree of arrays) -> its index."""
        i = len(self.events)
        self.events.append((pool, time.perf_counter(), after))
        self.ready.append(0.0)
        self._queues[pool].put((i, output))
        return i

    def add_span(self, pool: str, start: float, end: float) -> int:
        """Record a piece timed elsewhere (another process's perf_counter: the same monotonic clock on
        one host) -> its index."""
        self.events.append((pool, start, ()))
        self.ready.append(end)
        return len(self.events) - 1

    def finish(self) -> Busy:
        """Wait for every recorded piece, and start afresh."""
        for q in self._queues.values():
            q.join()
        out = busy(self.events, self.ready)
        self.events, self.ready = [], []
        return out

    def _watch(self, q: queue.Queue) -> None:
        while True:
            i, output = q.get()
            try:
                jax.block_until_ready(output)
            except Exception:  # noqa: BLE001 -- a failed piece fails the step on the main thread
                pass
            self.ready[i] = time.perf_counter()
            q.task_done()
