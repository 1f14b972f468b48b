"""Placements: a layout on a concrete mesh, passed to whatever runs under it (never a global).

A model holds two, `Placements(attention, experts)`: where its attention side lives (attention,
norms, router, shared experts, embedding, the KV cache) and where its routed experts live. Colocated
they are the same object; a split layout (attention and experts on disjoint devices) gives two.

Model code calls `constrain` and `local` with the placement it was given and logical axes only; with
no placement (one device) both are the identity. `local` runs a function per shard (`jax.shard_map`)
with specs derived from the layout's rules -- for the two operations GSPMD cannot partition well:
attention over a KV cache whose blocks are split by request, and expert-parallel MoE.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax
from jax.sharding import Mesh, NamedSharding

from .layout import Layout, LayoutError, SplitLayout


@dataclass(frozen=True, eq=False)
class Placement:
    layout: Layout
    mesh: Mesh

    def sharding(self, logical_axes: tuple[str | None, ...]) -> NamedSharding:
        return NamedSharding(self.mesh, self.layout.spec(logical_axes))

    def shards(self, logical: str) -> int:
        return self.layout.shards(logical)

    def axes(self, logical: str) -> tuple[str, ...]:
        return self.layout.mesh_axes(logical)


@dataclass(frozen=True, eq=False)
class Placements:
    """Where a model's two sides live (None: one device, unsharded)."""

    attention: Placement | None = None
    experts: Placement | None = None

    @property
    def colocated(self) -> bool:
        return self.attention is self.experts

    def validate(self, cfg) -> None:
        for p in {id(p): p for p in (self.attention, self.experts) if p is not None}.values():
            p.layout.validate(cfg, p.mesh.size)


def make_placements(layout: "Layout | SplitLayout | None", devices: list | None = None) -> Placements:
    """A layout on a mesh of `devices` (default: all devices, across processes). A Layout places both
    sides on one mesh; an attention/experts SplitLayout puts each side on its own devices."""
    if layout is None:
        return Placements()
    if isinstance(layout, SplitLayout):
        if layout.kind != "attention_expert":
            raise LayoutError(f"split layout {layout.name!r} is a {layout.kind} layout: it places two engines, "
                              "not one model (give each engine one of its parts)")
        parts = layout.split_devices(devices)
        return Placements(*(Placement(layout.parts[r], layout.parts[r].make_mesh(parts[r]))
                            for r in ("attention", "experts")))
    if layout.num_devices == 1 and devices is None:
        return Placements()
    placement = Placement(layout, layout.make_mesh(devices))
    return Placements(placement, placement)


def constrain(x: jax.Array, logical_axes: tuple[str | None, ...], placement: Placement | None) -> jax.Array:
    if placement is None or placement.mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, placement.sharding(logical_axes))


def local(fn: Callable, in_axes: tuple, out_axes, placement: Placement | None) -> Callable:
    """fn applied per shard; in_axes / out_axes: one tuple of logical axes per array argument / result
    (None for a replicated scalar). With no placement, fn itself."""
    if placement is None or placement.mesh.size == 1:
        return fn

    def spec(axes):
        return placement.layout.spec(()) if axes is None else placement.layout.spec(axes)

    return jax.shard_map(fn, mesh=placement.mesh, in_specs=jax.tree.map(spec, in_axes, is_leaf=_is_axes),
                         out_specs=jax.tree.map(spec, out_axes, is_leaf=_is_axes), check_vma=False)


def _is_axes(x) -> bool:
    return x is None or (isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x))
