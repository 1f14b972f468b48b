"""The KV cache's bookkeeping: a block allocator and per-request block tables, and for models with
Gated DeltaNet layers (Qwen3-Next) a state-slot allocator: such a layer keeps per request one
fixed-size state slot instead of blocks, so a request holds blocks (attention layers) and one slot.

The device arrays live in the executor; here are only block and slot ids. Capacity comes from a
memory budget.
"""

from __future__ import annotations

from collections import deque

from moejax.config import ModelConfig
from moejax.engine.request import Request


def kv_block_bytes(cfg: ModelConfig, block_size: int) -> int:
    """Bytes of one block across all layers (K and V)."""
    per_token = sum(cfg.kv_elems_per_token(i) for i in range(cfg.num_layers))
    return per_token * block_size * cfg.dtype_bytes


def state_slot_bytes(cfg: ModelConfig) -> int:
    """Bytes of one request's state slot across all layers (0 without Gated DeltaNet layers)."""
    return sum(cfg.state_bytes(i) for i in range(cfg.num_layers))


def kv_bytes(cfg: ModelConfig, num_tokens: int) -> int:
    """Bytes one request of num_tokens tokens keeps: per-token KV of the attention layers plus its
    fixed-size state slot (blocks rounded up to whole blocks are the allocator's concern, not this)."""
    return num_tokens * kv_block_bytes(cfg, 1) + state_slot_bytes(cfg)


def kv_capacity(cfg: ModelConfig, block_size: int, budget_bytes: int) -> int:
    """How many blocks fit in `budget_bytes`."""
    n = budget_bytes // kv_block_bytes(cfg, block_size)
    if n < 1:
        raise ValueError(f"KV cache budget of {budget_bytes} bytes holds no block "
                         f"(one block is {kv_block_bytes(cfg, block_size)} bytes)")
    return int(n)


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
    """Block tables over `num_shards` equal block ranges. Under data parallelism each request shard
    owns one range: a request takes all its blocks from one shard (chosen at its first allocation:
    the one with most free blocks), so its attention runs where its KV is. With `num_state_slots`
    (models with Gated DeltaNet layers) a request also takes a state slot at its first allocation
    and keeps it until freed: it cannot be allocated for while no slot is free."""

    def __init__(self, num_blocks: int, block_size: int, num_shards: int = 1, num_state_slots: int = 0):
        if num_blocks % num_shards:
            raise ValueError(f"{num_blocks} KV blocks do not split evenly over {num_shards} request shards")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.blocks_per_shard = num_blocks // num_shards
        per = self.blocks_per_shard
        self.shards = [BlockAllocator(range(i * per, (i + 1) * per)) for i in range(num_shards)]
        self.state_slots = StateSlotAllocator(num_state_slots) if num_state_slots else None

    @property
    def num_free_blocks(self) -> int:
        return sum(a.num_free for a in self.shards)

    def shard_of(self, req: Request) -> int | None:
        return req.block_ids[0] // self.blocks_per_shard if req.block_ids else None

    def _allocator(self, req: Request) -> BlockAllocator:
        shard = self.shard_of(req)
        return max(self.shards, key=lambda a: a.num_free) if shard is None else self.shards[shard]

    def blocks_needed(self, req: Request, num_new_tokens: int) -> int:
        """Extra blocks for req to hold KV of its first num_computed + num_new_tokens tokens."""
        total = -(-(req.num_computed_tokens + num_new_tokens) // self.block_size)
        return max(0, total - len(req.block_ids))

    def needs_slot(self, req: Request) -> bool:
        return self.state_slots is not None and req.state_slot is None

    def can_allocate(self, req: Request, num_new_tokens: int) -> bool:
        return self.blocks_needed(req, num_new_tokens) <= self._allocator(req).num_free and \
            (not self.needs_slot(req) or self.state_slots.num_free > 0)

    def can_allocate_all(self, requests: list[Request], num_new_tokens: int) -> bool:
        """Whether every one of `requests` (running, each holding blocks) can grow by num_new_tokens."""
        need = [0] * len(self.shards)
        for r in requests:
            need[self.shard_of(r)] += self.blocks_needed(r, num_new_tokens)
        return all(n <= a.num_free for n, a in zip(need, self.shards))

    def allocate(self, req: Request, num_new_tokens: int) -> None:
        new = self.blocks_needed(req, num_new_tokens)
        if new:
            req.block_ids += tuple(self._allocator(req).allocate(new))
        if self.needs_slot(req):
            req.state_slot = self.state_slots.allocate()

    def free(self, req: Request) -> None:
        if req.block_ids:
            self.shards[self.shard_of(req)].free(list(req.block_ids))
        req.block_ids = ()
        if req.state_slot is not None:
            self.state_slots.free(req.state_slot)
            req.state_slot = None
