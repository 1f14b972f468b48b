"""Layouts: named mesh axes, their sizes, and the rules mapping the models' logical axes to them.

Models speak only logical axes:

    batch     token rows (requests) — data parallelism; the KV cache's blocks follow it
    embed     the hidden dimension D
    vocab     the vocabulary
    q_heads   query heads (flattened H * head_dim) — tensor parallelism over heads
    kv_heads  key/value heads (must map like q_heads: a shard keeps the KV its q heads read)
    mlp       dense MLP / shared-expert width
    expert    routed experts — expert parallelism
    expert_mlp the intermediate width F inside an expert (kept whole: experts are not split)

A layout is declared, not coded: `Layout("mine", axes={"data": 2, "tensor": 4},
rules={"batch": "data", "q_heads": "tensor", "kv_heads": "tensor", "expert": ("data", "tensor")})`,
or the same as a TOML file (`Layout.from_toml`).
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh, PartitionSpec

LOGICAL_AXES = ("batch", "embed", "vocab", "q_heads", "kv_heads", "mlp", "expert", "expert_mlp")


class LayoutError(ValueError):
    """A layout does not fit the devices or the model; the message names the axis and the numbers."""


def _as_tuple(v) -> tuple[str, ...]:
    if v is None:
        return ()
    return (v,) if isinstance(v, str) else tuple(v)


@dataclass(frozen=True)
class Layout:
    name: str
    axes: dict[str, int] = field(default_factory=dict)  # mesh axis -> size, in mesh order
    rules: dict[str, tuple[str, ...] | str | None] = field(default_factory=dict)  # logical -> mesh axes

    def __post_init__(self):
        object.__setattr__(self, "axes", dict(self.axes))
        object.__setattr__(self, "rules", {k: _as_tuple(v) for k, v in self.rules.items()})
        for axis, size in self.axes.items():
            if not isinstance(size, int) or size < 1:
                raise LayoutError(f"layout {self.name!r}: mesh axis {axis!r} has size {size!r}; sizes are integers >= 1")
        for logical, mesh_axes in self.rules.items():
            if logical not in LOGICAL_AXES:
                raise LayoutError(f"layout {self.name!r}: unknown logical axis {logical!r} "
                                  f"(known: {', '.join(LOGICAL_AXES)})")
            for a in mesh_axes:
                if a not in self.axes:
                    raise LayoutError(f"layout {self.name!r}: rule {logical!r} -> {a!r} names no mesh axis "
                                      f"(mesh axes: {', '.join(self.axes) or 'none'})")
            if len(set(mesh_axes)) != len(mesh_axes):
                raise LayoutError(f"layout {self.name!r}: rule {logical!r} repeats a mesh axis: {mesh_axes}")
        if self.mesh_axes("q_heads") != self.mesh_axes("kv_heads"):
            raise LayoutError(f"layout {self.name!r}: q_heads -> {self.mesh_axes('q_heads')} but kv_heads -> "
                              f"{self.mesh_axes('kv_heads')}; they must shard alike (each shard reads its own KV heads)")

    # --- queries --------------------------------------------------------------------------------------
    @property
    def num_devices(self) -> int:
        return math.prod(self.axes.values())

    def mesh_axes(self, logical: str) -> tuple[str, ...]:
        return self.rules.get(logical, ())

    def shards(self, logical: str) -> int:
        """Into how many pieces the logical axis is split."""
        return math.prod(self.axes[a] for a in self.mesh_axes(logical))

    def spec(self, logical_axes: tuple[str | None, ...]) -> PartitionSpec:
        """PartitionSpec of an array whose dims carry these logical axes (None: replicated)."""
        parts = []
        used: set[str] = set()
        for name in logical_axes:
            mesh_axes = tuple(a for a in self.mesh_axes(name) if a not in used) if name else ()
            used.update(mesh_axes)
            parts.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
        return PartitionSpec(*parts)

    # --- building -------------------------------------------------------------------------------------
    def make_mesh(self, devices: list | None = None) -> Mesh:
        devices = list(jax.devices() if devices is None else devices)
        if len(devices) != self.num_devices:
            raise LayoutError(f"layout {self.name!r} needs {self.num_devices} devices "
                              f"({' x '.join(f'{a}={n}' for a, n in self.axes.items()) or 'one'}), "
                              f"{len(devices)} are available")
        if not self.axes:
            return Mesh(np.array(devices).reshape(()), ())
        return Mesh(np.array(devices).reshape(tuple(self.axes.values())), tuple(self.axes))

    # --- validation against a model ---------------------------------------------------------------------
    def validate(self, cfg, num_devices: int | None = None) -> None:
        """Every sharded logical dimension of `cfg` divides evenly; the layout fits the device count."""
        if num_devices is not None and num_devices != self.num_devices:
            raise LayoutError(f"layout {self.name!r} needs {self.num_devices} devices, {num_devices} are available")
        checks = [("q_heads", "attention heads", cfg.num_heads), ("kv_heads", "KV heads", cfg.num_kv_heads),
                  ("embed", "hidden size", cfg.hidden_size), ("vocab", "vocabulary entries", cfg.vocab_size),
                  ("expert", "experts", cfg.num_experts), ("mlp", "dense MLP width", cfg.dense_intermediate_size),
                  ("mlp", "shared-expert width", cfg.shared_expert_intermediate_size)]
        for logical, what, n in checks:
            k = self.shards(logical)
            if k > 1 and n % k:
                raise LayoutError(f"layout {self.name!r} splits {logical} over {'x'.join(self.mesh_axes(logical))} "
                                  f"= {k} ways, but {cfg.name} has {n} {what} (not divisible by {k})")
        if self.shards("expert_mlp") > 1:
            raise LayoutError(f"layout {self.name!r} shards expert_mlp: tensor parallelism inside experts is not "
                              "supported (shard experts over `expert` instead)")

    # --- files ----------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict) -> "Layout":
        unknown = set(d) - {"name", "axes", "rules"}
        if unknown:
            raise LayoutError(f"layout: unknown keys {sorted(unknown)} (expected name, axes, rules)")
        return cls(name=d.get("name", "custom"), axes=d.get("axes", {}), rules=d.get("rules", {}))

    @classmethod
    def from_toml(cls, path: str | Path) -> "Layout":
        """[axes] data = 2, tensor = 4   [rules] batch = "data", q_heads = "tensor", expert = ["data", "tensor"]"""
        with open(path, "rb") as f:
            d = tomllib.load(f)
        d.setdefault("name", Path(path).stem)
        return cls.from_dict(d)


ROLES = {"attention_expert": ("attention", "experts"), "prefill_decode": ("prefill", "decode")}


@dataclass(frozen=True)
class SplitLayout:
    """Two device pools apart, each with its own layout: attention and experts (Janus,
    MegaScale-Infer), or prefill and decode engines (PrfaaS). Declared and validated here; the
    executors that run on them build one mesh per part (`split_devices`)."""

    name: str
    kind: str  # "attention_expert" | "prefill_decode"
    parts: dict[str, Layout]

    def __post_init__(self):
        if self.kind not in ROLES:
            raise LayoutError(f"split layout {self.name!r}: kind {self.kind!r} is not one of {', '.join(ROLES)}")
        if set(self.parts) != set(ROLES[self.kind]):
            raise LayoutError(f"split layout {self.name!r} ({self.kind}) needs parts {ROLES[self.kind]}, "
                              f"got {tuple(self.parts)}")
        if self.kind == "attention_expert":
            if self.parts["attention"].shards("expert") > 1:
                raise LayoutError(f"split layout {self.name!r}: the attention part holds no experts, "
                                  "so it cannot shard `expert`")
            for logical in ("q_heads", "kv_heads"):
                if self.parts["experts"].shards(logical) > 1:
                    raise LayoutError(f"split layout {self.name!r}: the experts part holds no attention, "
                                      f"so it cannot shard `{logical}`")

    @property
    def num_devices(self) -> int:
        return sum(p.num_devices for p in self.parts.values())

    def validate(self, cfg, num_devices: int | None = None) -> None:
        if num_devices is not None and num_devices != self.num_devices:
            raise LayoutError(f"split layout {self.name!r} needs {self.num_devices} devices "
                              f"({' + '.join(f'{r}={p.num_devices}' for r, p in self.parts.items())}), "
                              f"{num_devices} are available")
        for part in self.parts.values():
            part.validate(cfg)

    def split_devices(self, devices: list | None = None) -> dict[str, list]:
        """Disjoint device lists per part, in declaration order of ROLES. Over several processes each
        part takes its share of every process's devices, so that both parts span every process (JAX
        moves arrays between meshes of one device set only, on CPU and GPU)."""
        devices = list(jax.devices() if devices is None else devices)
        if len(devices) != self.num_devices:
            raise LayoutError(f"split layout {self.name!r} needs {self.num_devices} devices, {len(devices)} given")
        hosts = [[d for d in devices if d.process_index == p] for p in sorted({d.process_index for d in devices})]
        sizes = [self.parts[role].num_devices for role in ROLES[self.kind]]
        if len(hosts) > 1 and all(n % len(hosts) == 0 for n in sizes):
            out, i = {}, 0
            for role, n in zip(ROLES[self.kind], sizes):
                k = n // len(hosts)
                out[role], i = [d for h in hosts for d in h[i:i + k]], i + k
            return out
        out, i = {}, 0
        for role, n in zip(ROLES[self.kind], sizes):
            out[role], i = devices[i:i + n], i + n
        return out
