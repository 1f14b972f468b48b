"""The activation exchange between the attention pool and the expert pool (Janus, arXiv 2512.13525).

Rows cross between two meshes on disjoint devices, so every transfer is a set of point-to-point
messages (device -> device, rows [lo, hi)), planned from the two shardings and the host of each
device. In one process, between pools of equal size, the bytes travel as one `jax.device_put` per
array (shard to shard) and a layout program inside the destination pool; otherwise as the plan's
messages, one `jax.device_put` each (asynchronous either way: nothing waits on the host). The
counted bytes and messages are always the plan's.

    direct      every destination device fetches its rows from the source devices that hold them
                (attention -> experts: each attention shard sends its rows to each expert device)
    two_phase   the rows of a source host are first gathered on one of its devices, cross to each
                destination host once (one message per host pair), and are scattered there

Both forms move the same values; two-phase sends fewer, larger messages across hosts and more
inside them. `seconds` prices a plan on an intra-host and an inter-host link (moejax.sim.hardware);
the executor picks the cheaper form per step. Hosts are the devices' processes, or emulated in one
process (`emulated_hosts`: each pool's devices split into that many contiguous groups).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from moejax.sim.hardware import GB, Link

FORMS = ("direct", "two_phase")
# Between hosts: InfiniBand NDR, 400 Gb/s = 50 GB/s per direction per NIC; ~5 µs per RDMA message.
HOST_NETWORK = Link("ndr400", 50 * GB, 5e-6)


@dataclass(frozen=True)
class Message:
    src: int  # device id
    dst: int
    lo: int  # rows [lo, hi) of the array
    hi: int
    cross_host: bool


@dataclass(frozen=True)
class Traffic:
    """What one form moves: all messages, and those between hosts."""

    messages: int = 0
    bytes: int = 0
    cross_host_messages: int = 0
    cross_host_bytes: int = 0

    def __add__(self, other: "Traffic") -> "Traffic":
        return Traffic(*(a + b for a, b in zip(self.astuple(), other.astuple())))

    def astuple(self) -> tuple[int, int, int, int]:
        return self.messages, self.bytes, self.cross_host_messages, self.cross_host_bytes


def traffic_of(plan: tuple[Message, ...], row_bytes: int) -> Traffic:
    cross = [m for m in plan if m.cross_host]
    return Traffic(len(plan), sum(m.hi - m.lo for m in plan) * row_bytes,
                   len(cross), sum(m.hi - m.lo for m in cross) * row_bytes)


def seconds(plan: tuple[Message, ...], row_bytes: int, intra: Link, inter: Link = HOST_NETWORK) -> float:
    """A plan's time with its messages one after another (an upper bound; what ranks the forms)."""
    return sum(link.latency_s + (m.hi - m.lo) * row_bytes / link.effective_bandwidth
               for m in plan for link in [inter if m.cross_host else intra])


def host_map(pools: dict[str, list], emulated_hosts: int | None = None) -> dict[int, int]:
    """device id -> host: its process, or (emulated) its group among its pool's devices."""
    if emulated_hosts is None:
        return {d.id: d.process_index for devices in pools.values() for d in devices}
    out = {}
    for devices in pools.values():
        if len(devices) % emulated_hosts:
            raise ValueError(f"emulated_hosts={emulated_hosts} does not divide a pool of {len(devices)} devices")
        out.update({d.id: k * emulated_hosts // len(devices) for k, d in enumerate(devices)})
    return out


def _rows(sharding: jax.sharding.Sharding, shape: tuple[int, ...]) -> dict[int, tuple[int, int]]:
    """device id -> the rows [lo, hi) it holds; only dimension 0 may be split."""
    out = {}
    for d, index in sharding.devices_indices_map(shape).items():
        if any(s != slice(None) and (s.start, s.stop) != (0, n) for s, n in zip(index[1:], shape[1:])):
            raise ValueError(f"exchange moves arrays split by rows only; {sharding} splits {shape} further")
        out[d.id] = (index[0].start or 0, shape[0] if index[0].stop is None else index[0].stop)
    return out


def _cover(lo: int, hi: int, sources: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Rows [lo, hi) taken from sources (key, lo, hi) in order of preference -> (key, lo, hi) pieces."""
    missing, pieces = [(lo, hi)], []
    for key, s_lo, s_hi in sources:
        rest = []
        for m_lo, m_hi in missing:
            a, b = max(m_lo, s_lo), min(m_hi, s_hi)
            if a < b:
                pieces.append((key, a, b))
                rest += [r for r in ((m_lo, a), (b, m_hi)) if r[0] < r[1]]
            else:
                rest.append((m_lo, m_hi))
        missing = rest
    if missing:
        raise ValueError(f"rows {missing} are held by no source device")
    return sorted(pieces, key=lambda p: p[1])


def _preferred(sources: dict[int, tuple[int, int]], dst: int, host: dict[int, int], turn: int) -> list:
    """Sources ordered: the destination itself, its host, then the others rotated by `turn` (replicas spread)."""
    keys = sorted(sources)
    keys = keys[turn % len(keys):] + keys[:turn % len(keys)]
    keys.sort(key=lambda k: (k != dst, host[k] != host[dst]))  # stable: the rotation orders each class
    return [(k, *sources[k]) for k in keys]


def plan(src_rows: dict[int, tuple[int, int]], dst_rows: dict[int, tuple[int, int]], host: dict[int, int],
         form: str) -> tuple[Message, ...]:
    """Messages taking every destination device its rows (dicts: device id -> rows [lo, hi), in mesh order)."""
    if form not in FORMS:
        raise ValueError(f"exchange form {form!r}: expected one of {', '.join(FORMS)}")
    out: list[Message] = []

    def send(src, dst, lo, hi):
        if src != dst:
            out.append(Message(src, dst, lo, hi, host[src] != host[dst]))

    if form == "direct":
        for turn, (d, (lo, hi)) in enumerate(dst_rows.items()):
            for s, a, b in _cover(lo, hi, _preferred(src_rows, d, host, turn)):
                send(s, d, a, b)
        return tuple(out)
    # two-phase: gather on each source host's first device, one message per host pair, scatter
    leaders: dict[int, tuple[int, int]] = {}  # source leader -> the span its host holds
    for h in dict.fromkeys(host[d] for d in src_rows):
        devices = [d for d in src_rows if host[d] == h]
        lo, hi = min(src_rows[d][0] for d in devices), max(src_rows[d][1] for d in devices)
        for s, a, b in _cover(lo, hi, _preferred({d: src_rows[d] for d in devices}, devices[0], host, 0)):
            send(s, devices[0], a, b)
        leaders[devices[0]] = (lo, hi)
    for turn, h in enumerate(dict.fromkeys(host[d] for d in dst_rows)):
        devices = [d for d in dst_rows if host[d] == h]
        lo, hi = min(dst_rows[d][0] for d in devices), max(dst_rows[d][1] for d in devices)
        for s, a, b in _cover(lo, hi, _preferred(leaders, devices[0], host, turn)):
            send(s, devices[0], a, b)
        for d in devices[1:]:
            send(devices[0], d, *dst_rows[d])
    return tuple(out)


class Exchange:
    """Moves row-split arrays between the two pools by a planned form, counting what it sends.
    Plans (and the multi-process move's programs) are cached per shape and shardings: steady state
    plans nothing."""

    def __init__(self, host: dict[int, int]):
        self.host = host
        self.pool_moves = True  # False: always point-to-point messages (benchmarks compare the two)
        self.sent = Traffic()  # running total since the last `take`
        self._cache: dict = {}

    def plan_for(self, shape: tuple[int, ...], src, dst, form: str) -> tuple[Message, ...]:
        key = (shape, src, dst, form)
        if key not in self._cache:
            self._cache[key] = plan(_rows(src, shape), _rows(dst, shape), self.host, form)
        return self._cache[key]

    def move(self, a: jax.Array, dst: jax.sharding.Sharding, form: str) -> jax.Array:
        """`a` (split by rows at most) laid out by `dst`, counted as `form`'s messages."""
        return self._layout(self.deliver((a,), dst, form)[0], dst)

    def deliver(self, arrays: tuple[jax.Array, ...], dst: jax.sharding.Sharding, form: str,
                held_as: jax.sharding.Sharding | None = None) -> tuple[jax.Array, ...]:
        """Arrays (split by rows at most) onto `dst`'s devices, each counted as `form`'s messages, laid out
        as `dst` or as equal row blocks over its devices (a program reading them lays them out as it
        needs). How the bytes travel: between pools of equal size in one process, one asynchronous
        `jax.device_put` for all of them (`_pool_move`); else the form's point-to-point messages
        (`_message_move`); over several processes one resharding program over both pools' devices
        (`_union_move`). held_as: the layout the rows are counted from (default each array's own; e.g.
        replicated rows that a program split in blocks only to send them)."""
        for a in arrays:
            self.sent += traffic_of(self.plan_for(a.shape, held_as or a.sharding, dst, form),
                                    a.nbytes // max(a.shape[0], 1))
        if not all(a.is_fully_addressable for a in arrays) or not dst.is_fully_addressable:
            return tuple(self._union_move(a, dst) for a in arrays)
        k = len(dst.device_set)
        if self.pool_moves and all(len(a.sharding.device_set) == k and a.shape[0] % k == 0 for a in arrays):
            return self._pool_move(arrays, dst)
        return tuple(self._message_move(a, dst, form) for a in arrays)

    def _pool_move(self, arrays: tuple[jax.Array, ...], dst: jax.sharding.Sharding) -> tuple[jax.Array, ...]:
        """Between pools of k devices each: every array split into k row blocks in its pool (no program
        when it is split so already), then one `jax.device_put` taking block j of each from source device
        j to destination device j (asynchronous: XLA copies shard to shard; a copy that changes the
        shard count would go through the host and wait). The host issues one call however many arrays
        and device pairs there are."""
        there = self._row_blocks(dst)
        return jax.device_put(tuple(self._layout(a, self._row_blocks(a.sharding)) for a in arrays),
                              (there,) * len(arrays))

    def _row_blocks(self, sharding: jax.sharding.NamedSharding) -> jax.sharding.NamedSharding:
        """Rows split in equal blocks over a sharding's mesh, every axis in mesh order."""
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(tuple(sharding.mesh.axis_names)))

    def _layout(self, a: jax.Array, sharding: jax.sharding.Sharding) -> jax.Array:
        """`a` laid out as `sharding` over the same devices (one program; none when it is already)."""
        if a.sharding.is_equivalent_to(sharding, a.ndim):
            return a
        key = ("layout", sharding)
        if key not in self._cache:
            self._cache[key] = jax.jit(lambda x: x, out_shardings=sharding)
        return self._cache[key](a)

    def _message_move(self, a: jax.Array, dst: jax.sharding.Sharding, form: str) -> jax.Array:
        """Every byte sent by `form`'s point-to-point messages, one `jax.device_put` each."""
        messages = self.plan_for(a.shape, a.sharding, dst, form)
        devices = {d.id: d for d in (*a.sharding.device_set, *dst.device_set)}
        held: dict[int, list[tuple[int, int, jax.Array]]] = {}  # device id -> pieces (lo, hi, array on it)
        for shard in a.addressable_shards:
            lo = shard.index[0].start or 0
            pieces = held.setdefault(shard.device.id, [])
            if not any(p[0] == lo for p in pieces):
                pieces.append((lo, lo + shard.data.shape[0], shard.data))
        for m in messages:
            held.setdefault(m.dst, []).append((m.lo, m.hi, jax.device_put(_take(held[m.src], m.lo, m.hi),
                                                                          devices[m.dst])))
        wanted = _rows(dst, a.shape)
        return jax.make_array_from_single_device_arrays(
            a.shape, dst, [_take(held[d.id], *wanted[d.id]) for d in dst.addressable_devices])

    def _union_move(self, a: jax.Array, dst: jax.sharding.Sharding) -> jax.Array:
        """A multi-process move: JAX reshards only within one device set (on CPU and GPU), so the rows
        go into an array over the union of both pools ([N, *piece]: each source device its piece,
        each destination device zeros), one jitted program lays them out as the destination wants,
        and the destination devices' pieces become the result. It waits for its input and output:
        left to run alongside the pools' own programs, the processes' gloo collectives deadlocked
        (tiny-qwen3-moe on 2 processes x 4 CPU devices)."""
        src = a.sharding
        src_rows, dst_rows = _rows(src, a.shape), _rows(dst, a.shape)
        by_id = {d.id: d for d in (*src.device_set, *dst.device_set)}
        union = jax.sharding.Mesh(np.array([by_id[i] for i in (*src_rows, *dst_rows)]), ("u",))
        spread = jax.sharding.NamedSharding(union, jax.sharding.PartitionSpec("u"))
        src_piece, dst_piece = src.shard_shape(a.shape), dst.shard_shape(a.shape)
        key = ("union", a.shape, a.dtype, src, dst)
        if key not in self._cache:
            self._cache[key] = jax.jit(partial(_lay_out, tuple(src_rows.values()), tuple(dst_rows.values()),
                                               dst_piece), out_shardings=spread)
        jax.block_until_ready(a)
        mine = {s.device.id: s.data for s in a.addressable_shards}
        local = [mine[i][None] if i in mine else self._zeros(by_id[i], src_piece, a.dtype)
                 for i in (*src_rows, *dst_rows) if by_id[i].process_index == jax.process_index()]
        out = self._cache[key](jax.make_array_from_single_device_arrays((len(union.devices), *src_piece), spread,
                                                                        local))
        pieces = {s.device.id: s.data for s in jax.block_until_ready(out).addressable_shards}
        return jax.make_array_from_single_device_arrays(a.shape, dst, [pieces[d.id][0] for d in dst.addressable_devices])

    def _zeros(self, device, shape, dtype) -> jax.Array:
        key = ("zeros", device.id, shape, dtype)
        if key not in self._cache:
            self._cache[key] = jax.device_put(np.zeros((1, *shape), dtype), device)
        return self._cache[key]

    def take(self) -> Traffic:
        """What was sent since the last call."""
        sent, self.sent = self.sent, Traffic()
        return sent


def _lay_out(src_rows: tuple, dst_rows: tuple, dst_piece: tuple, z: jax.Array) -> jax.Array:
    """z [S + D, *source piece] (source devices first) -> [S + D, *destination piece]: destination
    device n gets rows dst_rows[n] of the array the sources hold; source devices get zeros."""
    parts, at = [], 0
    for k, (lo, hi) in sorted(enumerate(src_rows), key=lambda p: p[1]):
        if lo == at < hi:  # one holder per row range (replicas skipped)
            parts.append(z[k][:hi - lo])
            at = hi
    full = jnp.concatenate(parts)
    return jnp.stack([jnp.zeros(dst_piece, z.dtype)] * len(src_rows) + [full[lo:hi] for lo, hi in dst_rows])


def _take(pieces: list[tuple[int, int, jax.Array]], lo: int, hi: int) -> jax.Array:
    """Rows [lo, hi) out of pieces held on one device (one op there, none when a piece is exactly it)."""
    parts = [(a, b, x) for a, b, x in sorted(pieces, key=lambda p: (p[0], -p[1])) if a < hi and b > lo]
    exact = [x for a, b, x in parts if (a, b) == (lo, hi)]
    if exact:
        return exact[0]
    chosen, at = [], lo
    for a, b, x in parts:
        if a <= at < b:
            chosen.append(x[at - a:min(b, hi) - a])
            at = min(b, hi)
    if at != hi:
        raise ValueError(f"rows [{lo}, {hi}) are not all held on this device")
    return chosen[0] if len(chosen) == 1 else jnp.concatenate(chosen)
