"""The placement the model is traced under: a layout on a concrete mesh.

Models call `constrain` and `local` with logical axes only; with no placement active (one device)
both are the identity. `local` runs a function per shard (`jax.shard_map`) with specs derived from
the layout's rules — for the two operations GSPMD cannot partition well: attention over a KV cache
whose blocks are split by request, and expert-parallel MoE.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import jax
from jax.sharding import Mesh, NamedSharding

from .layout import Layout


@dataclass(frozen=True)
class Placement:
    layout: Layout
    mesh: Mesh

    @property
    def key(self) -> tuple:
        """Identifies the placement in jit caches (a traced function depends on it)."""
        return (self.layout.name, tuple(self.layout.axes.items()), tuple(sorted(self.layout.rules.items())),
                tuple(d.id for d in self.mesh.devices.flat))

    def sharding(self, logical_axes: tuple[str | None, ...]) -> NamedSharding:
        return NamedSharding(self.mesh, self.layout.spec(logical_axes))

    def shards(self, logical: str) -> int:
        return self.layout.shards(logical)

    def axes(self, logical: str) -> tuple[str, ...]:
        return self.layout.mesh_axes(logical)


_active: list[Placement] = []


def active() -> Placement | None:
    return _active[-1] if _active else None


@contextlib.contextmanager
def use(placement: Placement | None) -> Iterator[None]:
    """Trace the enclosed code under `placement` (None: unsharded)."""
    _active.append(placement)
    try:
        yield
    finally:
        _active.pop()


def active_key() -> tuple | None:
    p = active()
    return None if p is None else p.key


def constrain(x: jax.Array, logical_axes: tuple[str | None, ...]) -> jax.Array:
    p = active()
    if p is None or p.mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, p.sharding(logical_axes))


def local(fn: Callable, in_axes: tuple, out_axes) -> Callable:
    """fn applied per shard; in_axes / out_axes: one tuple of logical axes per array argument / result
    (None for a replicated scalar). With no placement, fn itself."""
    p = active()
    if p is None or p.mesh.size == 1:
        return fn

    def spec(axes):
        return p.layout.spec(()) if axes is None else p.layout.spec(axes)

    return jax.shard_map(fn, mesh=p.mesh, in_specs=jax.tree.map(spec, in_axes, is_leaf=_is_axes),
                         out_specs=jax.tree.map(spec, out_axes, is_leaf=_is_axes), check_vma=False)


def _is_axes(x) -> bool:
    return x is None or (isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x))
