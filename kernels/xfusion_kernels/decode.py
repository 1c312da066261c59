"""Paged decode attention: one new query token per sequence against a block-paged KV cache.

The cache holds fixed-size blocks of `block_size` tokens; `block_tables[b, i]` names the physical block
holding tokens i*block_size .. (i+1)*block_size-1 of sequence b, so a sequence's blocks can sit anywhere.
"""

from __future__ import annotations  # keeps the `tl.constexpr` annotations unevaluated when triton is absent

import torch

from .prefill import require_triton

try:  # the package must import without triton: callers then fall back to the torch references
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None


def _decode_kernel(Q, KCache, VCache, Out, BlockTables, SeqLens,
                   stride_qb, stride_qh, stride_kblk, stride_kt, stride_kh, stride_vblk, stride_vt, stride_vh,
                   stride_ob, stride_oh, stride_table,
                   qk_scale, head_dim, block_size,
                   GROUP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    # One program = one sequence and one query head; it walks that sequence's blocks in order.
    b = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // GROUP  # grouped-query attention: GROUP query heads share one kv head
    seq_len = tl.load(SeqLens + b)

    offs_t = tl.arange(0, BLOCK_T)  # BLOCK_T is block_size rounded up to a power of two
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    q = tl.load(Q + b * stride_qb + head * stride_qh + offs_d, mask=d_ok, other=0.0).to(tl.float32)

    # Online softmax in base 2 (qk_scale already holds log2(e)); a large finite negative stands in for -inf so
    # masked lanes never produce inf - inf = nan.
    m_i = -1.0e30
    l_i = 0.0
    acc = tl.zeros([BLOCK_D], tl.float32)
    # Only the first cdiv(seq_len, block_size) table entries are read: the rest may be garbage (e.g. -1).
    for i in range(0, tl.cdiv(seq_len, block_size)):
        # int64 so block * stride cannot overflow for caches larger than 2**31 elements
        block = tl.load(BlockTables + b * stride_table + i).to(tl.int64)
        tok_ok = (offs_t < block_size) & (i * block_size + offs_t < seq_len)  # the last block may be partial
        mask = tok_ok[:, None] & d_ok[None, :]
        k = tl.load(KCache + block * stride_kblk + offs_t[:, None] * stride_kt + kv_head * stride_kh + offs_d[None, :],
                    mask=mask, other=0.0).to(tl.float32)
        v = tl.load(VCache + block * stride_vblk + offs_t[:, None] * stride_vt + kv_head * stride_vh + offs_d[None, :],
                    mask=mask, other=0.0).to(tl.float32)
        # A single query row is too small for tl.dot (needs >= 16 rows): multiply and reduce instead.
        s = tl.sum(k * q[None, :], axis=1) * qk_scale
        s = tl.where(tok_ok, s, -1.0e30)

        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        alpha = tl.exp2(m_i - m_new)  # rescales what was accumulated under the old running max
        p = tl.exp2(s - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        m_i = m_new

    # An empty sequence (seq_len 0) has nothing to attend to: write zeros rather than 0 / 0.
    out = acc / tl.where(l_i > 0, l_i, 1.0)
    tl.store(Out + b * stride_ob + head * stride_oh + offs_d, out.to(Out.dtype.element_ty), mask=d_ok)


if triton is not None:  # decorated here rather than with @triton.jit so the module imports without triton
    _decode_kernel = triton.jit(_decode_kernel)


def _check(q, k_cache, v_cache, block_tables, seq_lens):
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"expected q [B, Hq, D] and k_cache, v_cache [num_blocks, block_size, Hkv, D]; got "
                         f"{tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    batch, hq, d = q.shape
    if k_cache.shape[3] != d or hq % k_cache.shape[2]:
        raise ValueError(f"cache {tuple(k_cache.shape)} does not match q {tuple(q.shape)} (need same D, Hq % Hkv == 0)")
    if block_tables.dim() != 2 or block_tables.shape[0] != batch or seq_lens.shape != (batch,):
        raise ValueError("block_tables must be [B, max_blocks_per_seq] and seq_lens [B]")


def paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale=None):
    """Triton paged decode attention. q [B, Hq, D]; caches [num_blocks, block_size, Hkv, D]."""
    require_triton(q)
    _check(q, k_cache, v_cache, block_tables, seq_lens)
    batch, hq, d = q.shape
    block_size = k_cache.shape[1]
    scale = d ** -0.5 if scale is None else scale
    # The kernel assumes unit stride along D; other strides are passed through (a cache view is fine).
    q, k_cache, v_cache = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k_cache, v_cache))
    block_tables = block_tables.to(device=q.device, dtype=torch.int32).contiguous()
    seq_lens = seq_lens.to(device=q.device, dtype=torch.int32).contiguous()
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if batch == 0:
        return out
    _decode_kernel[(batch, hq)](
        q, k_cache, v_cache, out, block_tables, seq_lens,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1), block_tables.stride(0),
        scale * 1.4426950408889634, d, block_size,  # log2(e): the kernel uses exp2
        GROUP=hq // k_cache.shape[2], BLOCK_T=triton.next_power_of_2(block_size), BLOCK_D=triton.next_power_of_2(d),
    )
    return out


def paged_decode_attention_reference(q, k_cache, v_cache, block_tables, seq_lens, scale=None):
    """Plain torch version of `paged_decode_attention`: gather each sequence's blocks, float32 softmax."""
    _check(q, k_cache, v_cache, block_tables, seq_lens)
    batch, hq, d = q.shape
    block_size, hkv = k_cache.shape[1], k_cache.shape[2]
    scale = d ** -0.5 if scale is None else scale
    out = torch.zeros_like(q)
    for b, length in enumerate(seq_lens.tolist()):
        if length == 0:
            continue  # nothing to attend to: zeros, as the kernel writes
        blocks = block_tables[b, :-(-length // block_size)].long().to(k_cache.device)  # only the used entries
        ks = k_cache[blocks].reshape(-1, hkv, d)[:length].float()  # [L, Hkv, D] in logical order
        vs = v_cache[blocks].reshape(-1, hkv, d)[:length].float()
        ks = ks.repeat_interleave(hq // hkv, dim=1)  # query head h reads kv head h // group
        vs = vs.repeat_interleave(hq // hkv, dim=1)
        scores = torch.einsum("hd,lhd->hl", q[b].float(), ks) * scale
        out[b] = torch.einsum("hl,lhd->hd", scores.softmax(dim=-1), vs).to(q.dtype)
    return out
