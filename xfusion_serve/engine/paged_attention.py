"""The engine's attention objects: what the model's layer loop calls, over the paged KV pools.

Each one stores the keys/values a later step needs in its tower's pool (by slot mapping) and attends with a
backend of model/attention.py: `PrefillAttention` (whole prompts, packed), `DecodeAttention` (one text token
per sequence over its block table), `PrefixAttention` (a denoising step's image rows over their cached
prompts).
"""

from __future__ import annotations

import torch

from ..model.attention import TorchBackend
from .kv_cache import KVPool


def _token_major(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(-2, -3)


class PrefillAttention:
    """Whole prompts, packed: stores the kept towers' K/V in their pools, attends with the modality mask."""

    def __init__(self, backend: TorchBackend, pools: dict[str, KVPool], slots: dict[str, torch.Tensor],
                 cu_seqlens: list[int], image_ids: torch.Tensor):
        self.backend, self.pools, self.slots = backend, pools, slots
        self.meta = backend.prepare_prefill(cu_seqlens, image_ids)

    def keeps(self, tower: str) -> bool:
        return tower in self.slots

    def __call__(self, tower, layer, q, k, v):
        k, v = _token_major(k), _token_major(v)
        if tower in self.slots:
            self.pools[tower].write(layer, self.slots[tower], k, v)
        if q is None:
            return None
        return self.backend.prefill(_token_major(q), k, v, self.meta)


class DecodeAttention:
    """One text token per sequence: its query reads the sequence's cached tokens and its own K/V. Those K/V
    are written to the cache by `write_new_kv()` once the step is done (or before attending, for a backend
    whose kernel reads them from the cache)."""

    def __init__(self, backend: TorchBackend, pool: KVPool, slots, block_tables, seq_lens):
        self.backend, self.pool, self.slots = backend, pool, slots
        self.meta = backend.prepare_decode(block_tables, seq_lens, pool.block_size)
        self.new_kv: list[torch.Tensor] = []  # per layer [2, B, kv_heads, head_dim], not yet written

    def keeps(self, tower: str) -> bool:
        return tower == "text"

    def __call__(self, tower, layer, q, k, v):
        k, v = _token_major(k), _token_major(v)
        if self.backend.reads_new_kv_from_cache:
            self.pool.write(layer, self.slots, k, v)
        else:
            self.new_kv.append(torch.stack([k, v]))
        return self.backend.decode(_token_major(q), self.pool.kv[layer], self.meta, k, v)

    def pending(self) -> torch.Tensor | None:
        """Every layer's new K/V still to be written: [layers, 2, B, kv_heads, head_dim], or None."""
        return torch.stack(self.new_kv) if self.new_kv else None


class PrefixAttention:
    """Denoising steps: R rows of N image tokens, each over its cached prompt and its own image.
    prompts: per tower, per layer, every row's prompt keys and values; mask [R, 1, 1, P + N]."""

    def __init__(self, backend: TorchBackend, prompts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]],
                 mask: torch.Tensor):
        self.backend, self.prompts, self.mask = backend, prompts, mask

    @staticmethod
    def gather(backend: TorchBackend, pools: dict[str, KVPool], block_tables: dict[str, torch.Tensor],
               prefix_lens: torch.Tensor, num_tokens: int) -> tuple[dict, torch.Tensor]:
        """The prompts' K/V out of the pools and the mask, for as long as the same requests denoise together
        (their prompts never change): prompts [R, Hkv, P, d] per tower and layer, P the tables' width in
        tokens, and a mask hiding each row's table past its prompt."""
        prompts = {tower: [backend.gather(kv, tables) for kv in pools[tower].kv]
                   for tower, tables in block_tables.items()}
        prompt_len = next(iter(block_tables.values())).shape[1] * next(iter(pools.values())).block_size
        seen = torch.arange(prompt_len + num_tokens, device=prefix_lens.device)
        return prompts, ((seen < prefix_lens[:, None]) | (seen >= prompt_len))[:, None, None]

    def keeps(self, tower: str) -> bool:
        return False

    def __call__(self, tower, layer, q, k, v):
        return self.backend.prefix(_token_major(q), _token_major(k), _token_major(v), *self.prompts[tower][layer],
                                   self.mask)
