"""Attention backends behind one switch: the three attention patterns of X-Fusion serving, per backend.

    prefill          packed whole prompts, causal text and bidirectional images (chat, caption, image prompts)
    decode           one new text query per sequence over its paged cache
    prefix           the image tokens of a denoising step over their cached prompt plus their own image
Backends: "torch" (SDPA; the reference), "cpu" (the project's C++ decode kernel, float32 on the CPU: its
default), "triton" (the project's kernels in kernels/xfusion_kernels), "flash-attn" (GPU image only). Every
backend agrees with "torch".
The paged cache they read is one layer's [2, blocks, block_size, kv_heads, head_dim] (engine/kv_cache.py).
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

from .sequence import attention_mask

log = logging.getLogger(__name__)


BACKENDS = ("torch", "cpu", "triton", "flash-attn")


class TorchBackend:
    name = "torch"

    def prepare_prefill(self, cu_seqlens: list[int],
                        image_ids: torch.Tensor) -> list[tuple[int, int, torch.Tensor | None]]:
        """What every layer of one prefill shares, built once: each packed sequence's (start, end, mask), the
        mask [1, 1, T, T] bool (causal, an image's tokens see each other) where the sequence holds an image,
        None where it is text alone (causal). One host sync for the whole batch."""
        images_before = torch.cat([image_ids.new_zeros(1), (image_ids >= 0).cumsum(0)])[cu_seqlens].tolist()
        return [(s, e, attention_mask(image_ids[None, s:e]) if images_before[i + 1] > images_before[i] else None)
                for i, (s, e) in enumerate(zip(cu_seqlens[:-1], cu_seqlens[1:]))]

    def prefill(self, q, k, v, meta) -> torch.Tensor:
        """q [N, Hq, d], k/v [N, Hkv, d] packed as meta's sequences -> [N, Hq, d].
        The K/V heads are repeated to Hq and the inputs are 4-D: SDPA then takes its fused kernel, where
        `enable_gqa` or 3-D inputs take the unfused math path (on the CPU, one thread, 37 tokens of 4/2 heads
        of 32: 41 against 113 us a call)."""
        groups = q.shape[1] // k.shape[1]
        k, v = (x.repeat_interleave(groups, 1) for x in (k, v)) if groups > 1 else (k, v)
        out = torch.empty_like(q)
        for s, e, mask in meta:
            q_, k_, v_ = (x[None, s:e].transpose(1, 2) for x in (q, k, v))
            o = F.scaled_dot_product_attention(q_, k_, v_, attn_mask=mask, is_causal=mask is None)
            out[s:e] = o[0].transpose(0, 1)
        return out

    @staticmethod
    def gather(kv_cache: torch.Tensor, block_tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's [2, blocks, bs, Hkv, d] by tables [B, M] (padded with block 0, masked), keys and values
        in one indexing -> k, v [B, Hkv, M*bs, d]."""
        k, v = kv_cache[:, block_tables].flatten(2, 3).transpose(2, 3)
        return k, v

    # Decode reads the cached tokens from the pool and the new token's K/V from its arguments, so that the step
    # writes nothing into the pool (one write for every layer after it: a compiled step stays free of
    # mutation). Kernels that read the new token from the pool (triton, flash-attn) need it written first.
    reads_new_kv_from_cache = False

    def prepare_decode(self, block_tables: torch.Tensor, seq_lens: torch.Tensor, block_size: int):
        """What every layer of one decode step shares, built once per step: the tables and a mask [B, 1, 1,
        M*bs + 1] over the cached tokens before the new one, and the new one."""
        cached = torch.arange(block_tables.shape[1] * block_size, device=seq_lens.device) < seq_lens[:, None] - 1
        return block_tables, torch.cat([cached, cached.new_ones(len(seq_lens), 1)], 1)[:, None, None]

    def decode(self, q, kv_cache, meta, k, v) -> torch.Tensor:
        """q [B, Hq, d] over each sequence's seq_lens - 1 cached tokens and its new k, v [B, Hkv, d] -> [B, Hq, d].
        kv_cache: one layer's [2, blocks, bs, Hkv, d], keys and values gathered in one indexing."""
        block_tables, mask = meta
        cached_k, cached_v = self.gather(kv_cache, block_tables)
        keys, values = torch.cat([cached_k, k[:, :, None]], 2), torch.cat([cached_v, v[:, :, None]], 2)
        return F.scaled_dot_product_attention(q[:, :, None], keys, values, attn_mask=mask, enable_gqa=True)[:, :, 0]

    def prefix(self, q, k, v, prompt_k, prompt_v, mask: torch.Tensor) -> torch.Tensor:
        """q [R, N, Hq, d], k/v [R, N, Hkv, d]: each row sees its cached prompt and all N of its own tokens."""
        keys, values = torch.cat([prompt_k, k.transpose(1, 2)], 2), torch.cat([prompt_v, v.transpose(1, 2)], 2)
        return F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask,
                                              enable_gqa=True).transpose(1, 2)


class CpuBackend(TorchBackend):
    """Decode with the project's C++ kernel (kernels/xfusion_kernels/cpu_attention.cpp): float32 on the CPU, the
    cached K/V read in place through the block tables, the new token's from the arguments; prefill and prefix
    stay on SDPA. On the demo's shape the reference's gather, concatenation and mask took 41% of a decode
    step (py-spy, one thread, 16 sequences)."""

    name = "cpu"

    def __init__(self, op):
        self.op = op

    def prepare_decode(self, block_tables, seq_lens, block_size):
        return block_tables.to(torch.int32), seq_lens.to(torch.int32)

    def decode(self, q, kv_cache, meta, k, v):
        return self.op(q, kv_cache, *meta, k, v)


def cpu_backend_problem(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """Why the "cpu" backend cannot serve here (None: it can). Building its kernel takes 20-40 s the first time
    on a machine (then torch's cache)."""
    if device.type != "cpu" or dtype != torch.float32:
        return "it computes float32 on the CPU"
    if head_dim % 16:
        return f"it needs a head size that is a multiple of 16, not {head_dim}"
    from xfusion_kernels.cpu import cpu_paged_decode

    if cpu_paged_decode() is None:
        return "its C++ kernel could not be built here (see the warning above)"
    return None


def default_backend(device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    """ "cpu" where it can serve (float32 on the CPU), else "torch"."""
    if device.type != "cpu" or dtype != torch.float32:
        return "torch"
    if (problem := cpu_backend_problem(device, dtype, head_dim)) is not None:
        log.warning("attention backend torch: the cpu backend cannot serve this model (%s)", problem)
        return "torch"
    return "cpu"


class TritonBackend(TorchBackend):
    """The project's kernels for prefill and decode; the prefix pattern stays on SDPA."""

    name = "triton"

    def __init__(self):
        import xfusion_kernels

        self.k = xfusion_kernels

    def prepare_prefill(self, cu_seqlens, image_ids):
        return torch.tensor(cu_seqlens, dtype=torch.int32, device=image_ids.device), image_ids.to(torch.int32)

    def prefill(self, q, k, v, meta):
        return self.k.prefill_attention(q, k, v, *meta)

    reads_new_kv_from_cache = True

    def prepare_decode(self, block_tables, seq_lens, block_size):
        return block_tables.to(torch.int32), seq_lens.to(torch.int32)

    def decode(self, q, kv_cache, meta, k, v):
        return self.k.paged_decode_attention(q, kv_cache[0], kv_cache[1], *meta)


@functools.cache
def _flash_decode_op():
    """flash-attn's paged decode as a torch custom op. flash-attn 2 registers its varlen function with torch
    but not this one, so torch.compile would break the decode graph (and its CUDA graph) at every layer.
    The new token's K/V are already in the cache: the op reads its inputs and mutates nothing."""
    from flash_attn import flash_attn_with_kvcache

    @torch.library.custom_op("xfusion::flash_decode", mutates_args=())
    def flash_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor,
                     block_tables: torch.Tensor) -> torch.Tensor:
        return flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seq_lens, block_table=block_tables)

    @flash_decode.register_fake
    def _(q, k_cache, v_cache, seq_lens, block_tables):
        return torch.empty_like(q)

    return flash_decode


class FlashAttnBackend(TorchBackend):
    """flash-attn for text-only prefill and paged decode (its paged cache wants blocks of 256 tokens);
    prompts that hold an image need the modality mask, which flash-attn lacks: they use SDPA."""

    name = "flash-attn"

    def __init__(self):
        from flash_attn import flash_attn_varlen_func

        self.varlen, self.with_kvcache = flash_attn_varlen_func, _flash_decode_op()

    def prepare_prefill(self, cu_seqlens, image_ids):
        """SDPA's meta where a sequence holds an image, else flash-attn's varlen arguments."""
        if bool((image_ids >= 0).any()):
            return "sdpa", super().prepare_prefill(cu_seqlens, image_ids)
        longest = max(e - s for s, e in zip(cu_seqlens[:-1], cu_seqlens[1:]))
        return "varlen", (torch.tensor(cu_seqlens, dtype=torch.int32, device=image_ids.device), longest)

    def prefill(self, q, k, v, meta):
        kind, args = meta
        if kind == "sdpa":
            return super().prefill(q, k, v, args)
        cu, longest = args
        return self.varlen(q, k, v, cu, cu, longest, longest, causal=True)

    reads_new_kv_from_cache = True

    def prepare_decode(self, block_tables, seq_lens, block_size):
        return block_tables.to(torch.int32), seq_lens.to(torch.int32)

    def decode(self, q, kv_cache, meta, k, v):
        block_tables, seq_lens = meta
        return self.with_kvcache(q[:, None], kv_cache[0], kv_cache[1], seq_lens, block_tables)[:, 0]


def make_backend(name: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> TorchBackend:
    """The backend called `name` for a model of `head_dim` in `dtype` on `device`. Raises ValueError where it
    cannot serve that."""
    if name == "torch":
        return TorchBackend()
    if name == "cpu":
        if (problem := cpu_backend_problem(device, dtype, head_dim)) is not None:
            raise ValueError(f"the cpu attention backend cannot serve this model: {problem}")
        from xfusion_kernels.cpu import cpu_paged_decode

        return CpuBackend(cpu_paged_decode())
    if name == "triton":
        return TritonBackend()
    if name == "flash-attn":
        if device.type != "cuda":
            raise ValueError("the flash-attn backend needs a CUDA device")
        return FlashAttnBackend()
    raise ValueError(f"unknown attention backend {name!r}; use one of {', '.join(BACKENDS)}")
