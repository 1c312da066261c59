"""Inputs for the attention kernels' tests (tests/kernels on the CPU, tests/gpu on a GPU): ragged sequences of
text and image spans for prefill, and K/V written into a paged cache at shuffled blocks for decode."""

from __future__ import annotations

import torch


def make_prefill(layout, hq, hkv, d, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lens = [sum(n for _, n in seq) for seq in layout]
    image_ids = torch.tensor([i for seq in layout for i, n in seq for _ in range(n)], dtype=torch.int32)
    cu_seqlens = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    n = sum(lens)
    q, k, v = (torch.randn(n, h, d, generator=gen).to(dtype) for h in (hq, hkv, hkv))
    return q, k, v, cu_seqlens, image_ids


def make_paged(lens, block_size, hq, hkv, d, dtype=torch.float32, seed=0, spare_blocks=3):
    """Random per-sequence K/V written into a cache at shuffled physical blocks; also returns them unpaged."""
    gen = torch.Generator().manual_seed(seed)
    per_seq = [-(-n // block_size) for n in lens]
    num_blocks = sum(per_seq) + spare_blocks
    # NaN everywhere not written: reading an unused slot or block would poison the output
    k_cache = torch.full((num_blocks, block_size, hkv, d), float("nan"), dtype=dtype)
    v_cache = k_cache.clone()
    block_tables = torch.full((len(lens), max(per_seq) + 1), -1, dtype=torch.int32)  # -1: unused entries
    physical = torch.randperm(num_blocks, generator=gen).tolist()
    keys, values = [], []
    for b, n in enumerate(lens):
        ks, vs = (torch.randn(n, hkv, d, generator=gen).to(dtype) for _ in range(2))
        keys.append(ks)
        values.append(vs)
        for i in range(per_seq[b]):
            blk = physical.pop()
            block_tables[b, i] = blk
            rows = slice(i * block_size, min(n, (i + 1) * block_size))
            k_cache[blk, : rows.stop - rows.start] = ks[rows]
            v_cache[blk, : rows.stop - rows.start] = vs[rows]
    q = torch.randn(len(lens), hq, d, generator=gen).to(dtype)
    return q, k_cache, v_cache, block_tables, torch.tensor(lens, dtype=torch.int32), keys, values
