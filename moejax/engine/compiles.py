"""Counting XLA compilations and the time they take: to show (in tests and benchmarks) that steady
state compiles nothing, and to tell a run's compile time from its serving time.

A program fetched from JAX's persistent compilation cache (JAX_COMPILATION_CACHE_DIR; the tests use
one) counts as a compilation too: JAX times the fetch as the backend compile it replaces, and either
way the program was not in memory and serving waited for it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import jax

_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
_STAGES = {"/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
           _BACKEND_COMPILE}


@dataclass
class Compilations:
    count: int = 0  # backend (XLA) compilations
    seconds: float = 0.0  # tracing + lowering + compiling, on the calling thread


_active: list[Compilations] = []


def _listener(event: str, duration: float, **kwargs) -> None:
    if event in _STAGES:
        for c in _active:
            c.seconds += duration
            c.count += event == _BACKEND_COMPILE


jax.monitoring.register_event_duration_secs_listener(_listener)


@contextlib.contextmanager
def count_compilations() -> Iterator[Compilations]:
    """with count_compilations() as c: ...; then c.count compilations took c.seconds inside."""
    counter = Compilations()
    _active.append(counter)
    try:
        yield counter
    finally:
        _active.remove(counter)
