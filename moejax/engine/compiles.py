"""Counting XLA compilations, to show (in tests and benchmarks) that steady state compiles nothing."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax

_EVENT = "/jax/core/compile/backend_compile_duration"
_counters: list[list[int]] = []


def _listener(event: str, duration: float, **kwargs) -> None:
    if event == _EVENT:
        for c in _counters:
            c[0] += 1


jax.monitoring.register_event_duration_secs_listener(_listener)


@contextlib.contextmanager
def count_compilations() -> Iterator[list[int]]:
    """with count_compilations() as n: ...; n[0] is the number of backend compilations inside."""
    counter = [0]
    _counters.append(counter)
    try:
        yield counter
    finally:
        _counters.remove(counter)
