"""Where the experts live: every routed expert in host memory, a cache of N slots per MoE layer in
device memory, and the copies between them.

JAX memory kinds make this one code path on every platform: a device's `pinned_host` memory (or
`unpinned_host` where there is none) holds the experts, one array per expert and matrix, so a load
moves exactly one expert's bytes (`jax.device_put` into device memory; on GPU a DMA over PCIe, on
the CPU backend a real copy between two buffers of RAM). Copies are dispatched asynchronously: a
load staged now arrives while the device computes, and is written into its cache slot (one jitted
scatter per layer, the buffers donated) only when that layer runs.
"""

from __future__ import annotations

import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import SingleDeviceSharding

from moejax.engine.metadata import bucket
from moejax.models.model import ExpertBuffer, Model


LOAD_BUCKET = 4  # loads of one layer are padded to a power of two, at least this: few compiled shapes


def host_memory_kind(device) -> str:
    """pinned_host where the device has it (page-locked: DMA-able), else unpinned_host."""
    kinds = {m.kind for m in device.addressable_memories()}
    for kind in ("pinned_host", "unpinned_host"):
        if kind in kinds:
            return kind
    raise ValueError(f"device {device} has no host memory kind (its memories: {', '.join(sorted(kinds))}): "
                     "expert offload needs pinned_host or unpinned_host")


class HostExperts:
    """Every MoE layer's routed experts in host memory: gate_up[l][e] [D, 2F], down[l][e] [F, D].

    release: delete the model's device copies once the host holds the experts (the executor then owns
    the model: only it may run it)."""

    def __init__(self, model: Model, device, release: bool = False):
        self.device = device
        self.memory_kind = host_memory_kind(device)
        host = SingleDeviceSharding(device, memory_kind=self.memory_kind)
        self.gate_up: dict[int, list[jax.Array]] = {}
        self.down: dict[int, list[jax.Array]] = {}
        for layer, moe in enumerate(model.config.moe_layers):
            if not moe:
                continue
            weights = model.expert_weights(layer)
            gate_up, down = (np.asarray(w) for w in weights)
            self.gate_up[layer] = jax.device_put(list(gate_up), host)
            self.down[layer] = jax.device_put(list(down), host)
            if release:
                for w in weights:
                    w.delete()
        first = next(iter(self.gate_up))
        self.expert_bytes = self.gate_up[first][0].nbytes + self.down[first][0].nbytes  # one expert, both matrices
        self.dtype = self.gate_up[first][0].dtype
        self._stacked: dict[int, ExpertBuffer] = {}

    def stage(self, layer: int, expert: int) -> tuple[jax.Array, jax.Array]:
        """Start copying one expert into device memory (asynchronous) -> its device arrays."""
        dev = SingleDeviceSharding(self.device, memory_kind="device")
        return tuple(jax.device_put([self.gate_up[layer][expert], self.down[layer][expert]], dev))

    def stacked(self, layer: int, device) -> ExpertBuffer:
        """The layer's experts as one buffer on `device` (host compute: the CPU backend), built once."""
        if layer not in self._stacked:
            self._stacked[layer] = tuple(jax.device_put(np.stack([np.asarray(w) for w in parts]), device)
                                         for parts in (self.gate_up[layer], self.down[layer]))
        return self._stacked[layer]

    def probe_load_s(self, repeats: int = 3) -> float:
        """Measured seconds to copy one expert host -> device (median of `repeats`)."""
        layer = next(iter(self.gate_up))
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(self.stage(layer, 0))
            times.append(time.perf_counter() - t0)
        return float(np.median(times))


@partial(jax.jit, donate_argnums=(0, 1))
def _commit(gate_up, down, new_gate_up, new_down, slots):
    """Write experts [n, ...] into slots [n] of the buffers (slot N: dropped, bucket padding)."""
    return (gate_up.at[slots].set(jnp.stack(new_gate_up), mode="drop"),
            down.at[slots].set(jnp.stack(new_down), mode="drop"))


@jax.jit
def _extend(gate_up, down, extra_gate_up, extra_down):
    """The cache buffers with experts appended (a layer needing more experts than its slots)."""
    return (jnp.concatenate([gate_up, jnp.stack(extra_gate_up)]), jnp.concatenate([down, jnp.stack(extra_down)]))


class DeviceExpertCache:
    """Per MoE layer, gate_up [N, D, 2F] and down [N, F, D] in device memory; loads staged per slot
    until the layer commits them."""

    def __init__(self, host: HostExperts, num_slots: int):
        self.host, self.num_slots = host, num_slots
        dev = SingleDeviceSharding(host.device, memory_kind="device")
        self.buffers: dict[int, ExpertBuffer] = {}
        for layer in host.gate_up:
            gate_up, down = host.gate_up[layer][0], host.down[layer][0]
            self.buffers[layer] = (jnp.zeros((num_slots, *gate_up.shape), gate_up.dtype, device=dev),
                                   jnp.zeros((num_slots, *down.shape), down.dtype, device=dev))
        first = next(iter(self.buffers))
        self._zero = tuple(jnp.zeros(b.shape[1:], b.dtype, device=dev) for b in self.buffers[first])  # padding
        self.pending: dict[int, dict[int, tuple[jax.Array, jax.Array]]] = {l: {} for l in self.buffers}
        self.bytes_h2d = 0  # every byte copied host -> device

    def load(self, layer: int, expert: int, slot: int) -> None:
        """Start copying `expert` towards `slot` of the layer's cache (a later load into the slot wins)."""
        self.pending[layer][slot] = self.host.stage(layer, expert)
        self.bytes_h2d += self.host.expert_bytes

    def commit(self, layer: int, slots: set[int]) -> float:
        """Wait for the layer's staged loads into `slots` (what this pass needs) and write them in ->
        seconds waited. Loads into other slots stay in flight for a later pass (their slots hold no
        expert this pass reads)."""
        pending = {s: self.pending[layer].pop(s) for s in sorted(slots & self.pending[layer].keys())}
        if not pending:
            return 0.0
        waited = _wait(list(pending.values()))
        n = bucket(len(pending), minimum=LOAD_BUCKET)  # few shapes, few compilations
        staged = list(pending.values()) + [self._zero] * (n - len(pending))
        at = np.full(n, self.num_slots, np.int32)
        at[:len(pending)] = list(pending)
        self.buffers[layer] = _commit(*self.buffers[layer], [s[0] for s in staged], [s[1] for s in staged], at)
        return waited

    def stage_transient(self, layer: int, experts: list[int]) -> list[tuple[jax.Array, jax.Array]]:
        """Start loading `experts` for one pass only (see `with_transient`)."""
        self.bytes_h2d += len(experts) * self.host.expert_bytes
        return [self.host.stage(layer, e) for e in experts]

    def with_transient(self, layer: int, staged: list[tuple[jax.Array, jax.Array]]) -> tuple[ExpertBuffer, float]:
        """Wait for transient loads -> (the cache's buffers with them appended after slot N-1, padded to a
        bucket; seconds waited)."""
        waited = _wait(staged)
        staged = staged + [self._zero] * (bucket(len(staged), minimum=LOAD_BUCKET) - len(staged))
        return _extend(*self.buffers[layer], [s[0] for s in staged], [s[1] for s in staged]), waited


def _wait(arrays) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(arrays)
    return time.perf_counter() - t0
