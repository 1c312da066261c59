"""The KV cache: fixed-size blocks in one preallocated pool per tower, reference counted.

The text tower's pool holds the keys/values every text query sees (chat, captions); the vision tower's
pool holds an image prompt's keys/values, reused at every denoising step. A block is shared by every
request that needs the same prefix (the n images of one request, every request's unconditional prompt).
"""

from __future__ import annotations

from collections import deque

import torch


def _write_kv(kv: torch.Tensor, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    flat = kv[layer].flatten(1, 2)  # [2, blocks * block_size, kv_heads, head_dim]
    flat[0, slots] = k
    flat[1, slots] = v


# Under torch.compile, an op of its own declared as mutating the pool: the few new slots are then written in
# place, where a traced index-assignment into a view of the pool copies the whole pool at every step. Defined
# with torch.library.Library rather than the custom_op decorator, whose Python wrapper costs about 40 us a call
# (the write itself about 20). Eagerly the plain function runs.
_LIB = torch.library.Library("xfusion", "FRAGMENT")
_LIB.define("write_kv(Tensor(a!) kv, int layer, Tensor slots, Tensor k, Tensor v) -> ()")
_LIB.impl("write_kv", _write_kv, "CompositeExplicitAutograd")
torch.library.register_fake("xfusion::write_kv", lambda kv, layer, slots, k, v: None, lib=_LIB)
write_kv_op = torch.ops.xfusion.write_kv


class OutOfBlocks(RuntimeError):
    pass


class BlockAllocator:
    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.refs = [0] * num_blocks
        self.free_ids: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free_ids)

    def usage(self) -> float:
        return 1.0 - self.num_free / max(1, self.num_blocks)

    def allocate(self, n: int) -> list[int]:
        if n > len(self.free_ids):
            raise OutOfBlocks(f"{n} blocks wanted, {len(self.free_ids)} free")
        blocks = [self.free_ids.popleft() for _ in range(n)]
        for b in blocks:
            self.refs[b] = 1
        return blocks

    def share(self, blocks: list[int]) -> list[int]:
        for b in blocks:
            if self.refs[b] <= 0:
                raise ValueError(f"block {b} is free; only a held block can be shared")
            self.refs[b] += 1
        return list(blocks)

    def release(self, blocks: list[int]) -> None:
        for b in blocks:
            if self.refs[b] <= 0:
                raise ValueError(f"block {b} released twice")
            self.refs[b] -= 1
            if self.refs[b] == 0:
                self.free_ids.append(b)


class KVPool:
    """keys/values of one tower: [layers, 2, num_blocks + 1 (a scratch block), block_size, kv_heads, head_dim]."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device | str):
        if num_blocks < 1:
            raise ValueError("the KV cache budget is too small for a single block of each tower")
        self.block_size = block_size
        # One block more than the allocator hands out: padded rows of a fixed-shape (captured) decode step
        # write their K/V to its first slot, where no request ever reads.
        self.kv = torch.zeros(layers, 2, num_blocks + 1, block_size, kv_heads, head_dim, dtype=dtype,
                              device=device)
        self.scratch_slot = num_blocks * block_size
        self.blocks = BlockAllocator(num_blocks)

    @staticmethod
    def bytes_per_block(layers: int, kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype) -> int:
        return layers * 2 * block_size * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    @property
    def capacity(self) -> int:
        """Tokens the pool holds (the scratch block not counted)."""
        return self.blocks.num_blocks * self.block_size

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: [N, kv_heads, head_dim] into flat slots (block * block_size + offset)."""
        (write_kv_op if torch.compiler.is_compiling() else _write_kv)(self.kv, layer, slots, k, v)

    def write_all_layers(self, slots: torch.Tensor, kv: torch.Tensor) -> None:
        """kv [layers, 2, N, kv_heads, head_dim] into flat slots of every layer, in one indexing."""
        self.kv.flatten(2, 3)[:, :, slots] = kv

    def blocks_needed(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def slots(self, block_table: list[int], start: int, end: int) -> list[int]:
        bs = self.block_size
        return [block_table[p // bs] * bs + p % bs for p in range(start, end)]


def available_memory(device: torch.device) -> int:
    """Bytes still free for the KV cache once the weights are loaded: the accelerator's free memory, or on the
    CPU what the OS reports as available (MemAvailable), lowered to the cgroup's limit where one is set."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    free = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
    try:  # a container's memory limit (cgroup v2) counts, not the host's
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read())
        if limit != "max":
            free = min(free, int(limit) - used)
    except (OSError, ValueError):
        pass
    return max(free, 0)


def kv_cache_budget(requested: int | None, fraction: float, useful: int, free: int) -> int:
    """Bytes for both towers' pools: `requested` when given; otherwise `fraction` of the free memory (as vLLM
    sizes its cache from what the weights leave), but no more than `useful` (what every running request
    at full context could fill): a small model gets no more than it can use."""
    if requested is not None:
        return requested
    return max(0, min(int(free * fraction), useful))
