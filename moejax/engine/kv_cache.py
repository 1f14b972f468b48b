"""The paged KV cache's bookkeeping: block allocators and per-request block tables, per KV group.

The device arrays live in the executor; here are only block ids. Capacity comes from a memory budget.

KV groups (`kv_groups`): the layers of one attention window (None: full attention) share a pool of
blocks and one block table per request. A model without sliding windows has one group holding
every layer. A hybrid model (GPT-OSS: sliding-window and full-attention layers alternate) gets a
group per window, each with its own pool: a sliding-window layer only ever reads the last `window`
tokens, so its group's blocks that lie entirely before the window of the request's next token are
freed (when the request next allocates), and in decode the request holds at most
`window_blocks(window, block_size)` (= window / block_size + 1) of them while its full-attention
blocks grow with it. Every group's table is indexed by logical block (position // block_size): all
tables of a request have the same length, and a freed entry is -1.

A request's tables: `Request.block_ids` is group 0's (full attention when the model has any),
`Request.group_block_ids` the other groups'. Admission and preemption see every group: a request
fits when each group has the blocks it needs, its own expired window blocks counted as free.

State slots: a Gated DeltaNet layer (Qwen3-Next) belongs to no KV group; it keeps per request one
fixed-size recurrent state, in a slot of its own allocator (`StateSlotAllocator`) that a request
takes at its first allocation and keeps until freed. A request fits only when a slot is free too.
(MLA layers are paged like any other: their latent per token is what `kv_elems_per_token` counts.)
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from moejax.config import ModelConfig
from moejax.engine.request import Request

FREED = -1  # a table entry whose block was freed (before the window) or never allocated


@dataclass(frozen=True)
class KVGroup:
    """Layers whose KV blocks are allocated together: those with one attention window."""

    window: int | None  # None: full attention
    layers: tuple[int, ...]

    def first_live_block(self, num_computed: int, block_size: int) -> int:
        """The first logical block a row at position num_computed or later can read."""
        return 0 if self.window is None else max(0, num_computed - self.window + 1) // block_size


def kv_groups(cfg: ModelConfig) -> tuple[KVGroup, ...]:
    """The model's attention layers by attention window: full attention first, then windows
    ascending (Gated DeltaNet layers keep state slots, not blocks)."""
    attention = [(i, w) for i, (w, lin) in enumerate(zip(cfg.sliding_windows, cfg.linear_layers)) if not lin]
    windows = sorted({w for _, w in attention}, key=lambda w: -1 if w is None else w)
    return tuple(KVGroup(w, tuple(i for i, x in attention if x == w)) for w in windows)


def window_blocks(window: int, block_size: int) -> int:
    """Most blocks a request in decode holds for a window: the blocks `window` consecutive
    positions can touch (window / block_size + 1 when block_size divides the window)."""
    return -(-(window - 1) // block_size) + 1


def _bytes_per_token(cfg: ModelConfig, group: KVGroup) -> int:
    return sum(cfg.kv_elems_per_token(i) for i in group.layers) * cfg.dtype_bytes


def group_block_bytes(cfg: ModelConfig, group: KVGroup, block_size: int) -> int:
    """Bytes of one block of a KV group: K and V of block_size tokens in each of its layers."""
    return _bytes_per_token(cfg, group) * block_size


def kv_block_bytes(cfg: ModelConfig, block_size: int) -> int:
    """Bytes of one block across all layers (K and V): a logical block of a request in every group."""
    per_token = sum(cfg.kv_elems_per_token(i) for i in range(cfg.num_layers))
    return per_token * block_size * cfg.dtype_bytes


def state_slot_bytes(cfg: ModelConfig) -> int:
    """Bytes of one request's state slot across all layers (0 without Gated DeltaNet layers)."""
    return sum(cfg.state_bytes(i) for i in range(cfg.num_layers))


def kv_bytes(cfg: ModelConfig, num_tokens: int, block_size: int | None = None) -> int:
    """KV bytes one request holds once its KV covers num_tokens tokens: every token in a
    full-attention layer, the last min(num_tokens, window) in a sliding-window layer (what the
    request's last row attended to, itself included), and its state slot (`state_slot_bytes`,
    whatever num_tokens, Gated DeltaNet layers). block_size: in the paged cache's whole
    blocks (of a window group: the blocks holding those tokens; the cache frees the older ones when
    the request next allocates, so between allocations it may hold one more)."""
    total = 0
    for g in kv_groups(cfg):
        first = num_tokens - (num_tokens if g.window is None else min(num_tokens, g.window))  # first kept token
        if block_size is None:
            total += (num_tokens - first) * _bytes_per_token(cfg, g)
        else:
            total += (-(-num_tokens // block_size) - first // block_size) * group_block_bytes(cfg, g, block_size)
    return total + state_slot_bytes(cfg)


def group_blocks(cfg: ModelConfig, block_size: int, full_blocks: int, *, max_num_seqs: int, max_model_len: int,
                 num_shards: int = 1) -> tuple[int, ...]:
    """Blocks of each KV group given `full_blocks` for the full-attention layers: a window group
    gets no more than it can use -- every running request's decode window plus, per request shard,
    one request's whole prompt written at once -- nor more than full_blocks (in multiples of
    num_shards)."""
    per_seq = -(-max_model_len // block_size)
    counts = []
    for g in kv_groups(cfg):
        if g.window is None:
            counts.append(full_blocks)
            continue
        n = min(full_blocks, max_num_seqs * window_blocks(g.window, block_size) + num_shards * per_seq)
        counts.append(max(num_shards, n - n % num_shards))
    return tuple(counts)


def kv_pool_blocks(cfg: ModelConfig, block_size: int, budget_bytes: int, *, max_num_seqs: int, max_model_len: int,
                   num_shards: int = 1, max_full_blocks: int | None = None, state_slots: int = 0) -> tuple[int, ...]:
    """Blocks of each KV group (`group_blocks`) for the most full-attention blocks -- a multiple of
    num_shards, at least num_shards, at most max_full_blocks -- whose pools fit budget_bytes
    together, less `state_slots` state slots (`state_slot_bytes` each). A model without windows or
    state slots: one group of budget_bytes // kv_block_bytes blocks."""
    sizes = [group_block_bytes(cfg, g, block_size) for g in kv_groups(cfg)]
    slots = state_slots * state_slot_bytes(cfg)
    if budget_bytes - slots < sum(sizes):
        beside = f" beside {state_slots} state slots of {state_slot_bytes(cfg)} bytes (fewer state_slots or " \
                 "max_num_seqs)" if slots else ""
        raise ValueError(f"KV cache budget of {budget_bytes} bytes holds no block{beside} "
                         f"(one block of every layer is {kv_block_bytes(cfg, block_size)} bytes)")
    budget_bytes -= slots

    def pools(k: int) -> tuple[int, ...]:  # k blocks per request shard for the full-attention layers
        return group_blocks(cfg, block_size, k * num_shards, max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                            num_shards=num_shards)

    def fits(k: int) -> bool:
        return sum(n * b for n, b in zip(pools(k), sizes)) <= budget_bytes

    lo, hi = 1, budget_bytes // (min(sizes) * num_shards) + 1  # the largest fitting k is below hi
    if max_full_blocks is not None:
        hi = max(2, min(hi, max_full_blocks // num_shards + 1))
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return pools(lo)


def state_slots_for(cfg: ModelConfig, max_num_seqs: int, state_slots: int | None) -> int:
    """State slots of a model with Gated DeltaNet layers: `state_slots`, by default one per request
    that may run at once; 0 for other models."""
    if not cfg.has_state_slots:
        if state_slots:
            raise ValueError(f"state_slots={state_slots}: {cfg.name} has no Gated DeltaNet layers to keep state for")
        return 0
    slots = max_num_seqs if state_slots is None else state_slots
    if slots < 1:
        raise ValueError(f"state_slots={slots}: {cfg.name} needs at least one (a running request holds one)")
    return slots


class BlockAllocator:
    def __init__(self, block_ids: range):
        self.num_blocks = len(block_ids)
        self._free: deque[int] = deque(block_ids)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} KV blocks, {len(self._free)} free")
        return [self._free.popleft() for _ in range(n)]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(blocks)


class StateSlotAllocator:
    """Fixed-size per-request state slots (ids 0 .. num_slots-1)."""

    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self._free: deque[int] = deque(range(num_slots))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError(f"asked for a state slot, all {self.num_slots} are taken")
        return self._free.popleft()

    def free(self, slot: int) -> None:
        self._free.append(slot)


class KVCacheManager:
    """Block tables over `num_shards` equal block ranges of each KV group's pool. Under data
    parallelism each request shard owns one range of every pool: a request takes all its blocks from
    one shard (chosen at its first allocation: the one with most free blocks of group 0), so its
    attention runs where its KV is.

    num_blocks: blocks of each group (one count: the same for every group); windows: each group's
    attention window (None: full attention), as `kv_groups` orders them; num_state_slots: state
    slots (models with Gated DeltaNet layers), shared by every request shard."""

    def __init__(self, num_blocks: int | Sequence[int], block_size: int, num_shards: int = 1,
                 windows: Sequence[int | None] = (None,), num_state_slots: int = 0):
        counts = [num_blocks] * len(windows) if isinstance(num_blocks, int) else list(num_blocks)
        if len(counts) != len(windows):
            raise ValueError(f"{len(counts)} block counts for {len(windows)} KV groups (windows {list(windows)})")
        for n, w in zip(counts, windows):
            if n % num_shards:
                raise ValueError(f"{n} KV blocks (window {w}) do not split evenly over {num_shards} request shards")
        self.block_size = block_size
        self.groups = tuple(KVGroup(w, ()) for w in windows)
        self.group_num_blocks = tuple(counts)
        self.group_blocks_per_shard = tuple(n // num_shards for n in counts)
        self.pools = [[BlockAllocator(range(i * per, (i + 1) * per)) for i in range(num_shards)]
                      for per in self.group_blocks_per_shard]
        self.shards = self.pools[0]  # group 0's allocators, one per request shard
        self.state_slots = StateSlotAllocator(num_state_slots) if num_state_slots else None
        # One full-attention pool and no state slots (most models): a request grows by whole blocks at
        # the end of one table, nothing expires -- can_allocate / allocate take a short path
        self.plain = [g.window for g in self.groups] == [None] and self.state_slots is None

    @property
    def num_blocks(self) -> int:
        return sum(self.group_num_blocks)

    @property
    def blocks_per_shard(self) -> int:
        """Blocks per request shard of the smallest group (what bounds one request)."""
        return min(self.group_blocks_per_shard)

    @property
    def num_free_blocks(self) -> int:
        return sum(a.num_free for pool in self.pools for a in pool)

    def tables(self, req: Request) -> tuple[tuple[int, ...], ...]:
        """Every group's block table of req (group 0 first)."""
        return (req.block_ids, *(req.group_block_ids or ((),) * (len(self.groups) - 1)))

    def shard_of(self, req: Request) -> int | None:
        """The request shard owning req's blocks (None: it holds none)."""
        if req.block_ids and req.block_ids[-1] >= 0:  # the newest block is live unless a window is tiny
            return req.block_ids[-1] // self.group_blocks_per_shard[0]
        for g, table in enumerate(self.tables(req)):
            live = [b for b in table if b >= 0]
            if live:
                return live[0] // self.group_blocks_per_shard[g]
        return None

    def _shard(self, req: Request) -> int:
        shard = self.shard_of(req)
        if shard is None:
            return max(range(len(self.shards)), key=lambda i: self.shards[i].num_free)
        return shard

    def blocks_needed(self, req: Request, num_new_tokens: int) -> int:
        """Extra logical blocks for req to hold KV of its first num_computed + num_new_tokens tokens
        (each group allocates them, less those before its window)."""
        total = -(-(req.num_computed_tokens + num_new_tokens) // self.block_size)
        return max(0, total - len(req.block_ids))

    def _plan(self, req: Request, num_new_tokens: int, g: int, table: tuple[int, ...]):
        """Group g's table change for num_new_tokens more tokens -> (first live logical block: the
        entries before it are freed, its expired blocks to free, blocks to allocate at the end)."""
        total = -(-(req.num_computed_tokens + num_new_tokens) // self.block_size)
        first = min(self.groups[g].first_live_block(req.num_computed_tokens, self.block_size), total)
        return first, [b for b in table[:first] if b >= 0], max(0, total - max(len(table), first))

    def needs_slot(self, req: Request) -> bool:
        return self.state_slots is not None and req.state_slot is None

    def can_allocate(self, req: Request, num_new_tokens: int) -> bool:
        return self.can_allocate_all([req], num_new_tokens)

    def can_allocate_all(self, requests: list[Request], num_new_tokens: int) -> bool:
        """Whether every one of `requests` can grow by num_new_tokens in every KV group, allocated in
        any order: each counts what it needs beyond its own expired window blocks, and a state slot
        if it holds none."""
        if self.plain:
            need_of_shard = [0] * len(self.shards)
            for r in requests:
                need_of_shard[self._shard(r)] += self.blocks_needed(r, num_new_tokens)
            return all(n <= a.num_free for n, a in zip(need_of_shard, self.shards))
        if self.state_slots is not None and sum(map(self.needs_slot, requests)) > self.state_slots.num_free:
            return False
        need: dict[tuple[int, int], int] = {}  # (group, shard) -> blocks
        for r in requests:
            shard = self._shard(r)
            for g, table in enumerate(self.tables(r)):
                _, expired, new = self._plan(r, num_new_tokens, g, table)
                need[g, shard] = need.get((g, shard), 0) + max(0, new - len(expired))
        return all(n <= self.pools[g][shard].num_free for (g, shard), n in need.items())

    def allocate(self, req: Request, num_new_tokens: int) -> None:
        """Blocks for req's next num_new_tokens tokens in every group; a window group first frees
        its blocks before the window of req's next token."""
        shard = self._shard(req)
        if self.plain:
            req.block_ids += tuple(self.shards[shard].allocate(self.blocks_needed(req, num_new_tokens)))
            return
        tables = []
        for g, table in enumerate(self.tables(req)):
            first, expired, new = self._plan(req, num_new_tokens, g, table)
            allocator = self.pools[g][shard]
            allocator.free(expired)
            tables.append((FREED,) * first + table[first:] + tuple(allocator.allocate(new)))
        req.block_ids, req.group_block_ids = tables[0], tuple(tables[1:])
        if self.needs_slot(req):
            req.state_slot = self.state_slots.allocate()

    def free(self, req: Request) -> None:
        shard = self.shard_of(req)
        for g, table in enumerate(self.tables(req)):
            live = [b for b in table if b >= 0]
            if live:
                self.pools[g][shard].free(live)
        req.block_ids, req.group_block_ids = (), ()
        if req.state_slot is not None:
            self.state_slots.free(req.state_slot)
            req.state_slot = None
