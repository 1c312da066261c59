"""Modality-masked varlen prefill attention.

X-Fusion prompts interleave text and images in one sequence. Text tokens attend causally, while the
tokens of one image also see each other in both directions (an image is generated/encoded as a whole).
Sequences of a batch are packed back to back (no padding) and described by `cu_seqlens`.
"""

from __future__ import annotations  # keeps the `tl.constexpr` annotations unevaluated when triton is absent

import os

import torch

try:  # the package must import without triton: callers then fall back to the torch references
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None

# Query/key tile sizes. The interpreter runs every tile as numpy code, so small tiles keep tests fast and make
# short test sequences cross several tile boundaries; on a GPU larger tiles amortise the loads.
INTERPRET_BLOCK = 16
CUDA_BLOCK = 64


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def require_triton(t: torch.Tensor) -> None:
    """Raise unless the Triton kernels can run on `t`: triton installed and (CUDA tensor or interpreter on)."""
    if triton is None:
        raise RuntimeError("Triton is unavailable: the `triton` package is not installed; "
                           "use the *_reference functions instead")
    if not (t.is_cuda or _interpreting()):
        raise RuntimeError(f"Triton is unavailable for tensors on {t.device}: needs CUDA tensors or "
                           "TRITON_INTERPRET=1; use the *_reference functions instead")
    if _interpreting() and not interpreter_ready():
        raise RuntimeError("Triton is unavailable: TRITON_INTERPRET=1 was set after triton was first imported "
                           "(torch._dynamo imports it when present); set it before any import of torch or triton")


def interpreter_ready() -> bool:
    """Whether triton was imported in interpreter mode.

    triton decorates its own helpers (tl.sum, tl.max, ...) once, when first imported, and picks interpreter or
    compiler at that moment. Setting TRITON_INTERPRET later is not enough: the kernels would still call
    compiled-mode helpers and fail with "Cannot call @triton.jit'd outside of the scope of a kernel".
    """
    return triton is not None and type(tl.sum).__name__ == "InterpretedFunction"


def _prefill_kernel(Q, K, V, Out, CuSeqlens, ImageIds, KvEnd,
                    stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_on, stride_oh,
                    qk_scale, head_dim,
                    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    UPCAST: tl.constexpr):
    # One program = one tile of BLOCK_M queries of one sequence and one query head.
    pid_m = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    kv_head = head // GROUP  # grouped-query attention: GROUP query heads share one kv head

    seq_start = tl.load(CuSeqlens + seq)
    seqlen = tl.load(CuSeqlens + seq + 1) - seq_start
    start = seq_start.to(tl.int64)  # int64 so token * stride cannot overflow on big batches
    if pid_m * BLOCK_M >= seqlen:  # the grid is sized for the longest sequence
        return

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # query positions within the sequence
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < seqlen
    d_ok = offs_d < head_dim  # BLOCK_D is head_dim rounded up to a power of two
    q = tl.load(Q + (start + offs_m)[:, None] * stride_qn + head * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:  # see the launcher: the interpreter cannot multiply bfloat16
        q = q.to(tl.float32)
    img_q = tl.load(ImageIds + start + offs_m, mask=row_ok, other=-1)
    # Keys past the last one any query of this tile may see are skipped: that is the causal saving, widened
    # by the launcher so image tokens still reach the later tokens of their own image.
    kv_stop = tl.max(tl.load(KvEnd + start + offs_m, mask=row_ok, other=0), axis=0)

    # Online softmax in base 2 (qk_scale already holds log2(e)). Masked scores get a large finite negative
    # value rather than -inf so padded rows and fully masked tiles never produce inf - inf = nan.
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(0, kv_stop, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        col_ok = offs_n < seqlen
        kt = tl.load(K + (start + offs_n)[None, :] * stride_kn + kv_head * stride_kh + offs_d[:, None],
                     mask=col_ok[None, :] & d_ok[:, None], other=0.0)  # loaded transposed: [BLOCK_D, BLOCK_N]
        v = tl.load(V + (start + offs_n)[:, None] * stride_vn + kv_head * stride_vh + offs_d[None, :],
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
            v = v.to(tl.float32)
        # "ieee": float32 inputs would otherwise be rounded to tf32 on GPUs and miss the reference by ~1e-3.
        s = tl.dot(q, kt, input_precision="ieee") * qk_scale
        img_k = tl.load(ImageIds + start + offs_n, mask=col_ok, other=-1)
        same_image = (img_q[:, None] >= 0) & (img_q[:, None] == img_k[None, :])
        allowed = ((offs_n[None, :] <= offs_m[:, None]) | same_image) & col_ok[None, :]
        s = tl.where(allowed, s, -1.0e30)

        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)  # rescales what was accumulated under the old running max
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new

    out = acc / l_i[:, None]  # every real row sees at least itself, so l_i > 0 there
    tl.store(Out + (start + offs_m)[:, None] * stride_on + head * stride_oh + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


if triton is not None:  # decorated here rather than with @triton.jit so the module imports without triton
    _prefill_kernel = triton.jit(_prefill_kernel)


def _check(q, k, v, cu_seqlens, image_ids):
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape:
        raise ValueError(f"expected q [N, Hq, D] and k, v [N, Hkv, D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    n, hq, d = q.shape
    if k.shape[0] != n or k.shape[2] != d or hq % k.shape[1]:
        raise ValueError(f"k/v {tuple(k.shape)} do not match q {tuple(q.shape)} (need same N, D and Hq % Hkv == 0)")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1 or image_ids.shape != (n,):
        raise ValueError("cu_seqlens must be [B+1] and image_ids [N]")
    if cu_seqlens[[0, -1]].tolist() != [0, n]:
        raise ValueError(f"cu_seqlens must run from 0 to N={n}; got {cu_seqlens.tolist()}")


def _kv_end(cu_seqlens: torch.Tensor, image_ids: torch.Tensor) -> torch.Tensor:
    """Per token, one past the last key position (within its sequence) it may attend to."""
    n = image_ids.shape[0]
    starts = cu_seqlens[:-1].long()
    seq_idx = torch.repeat_interleave(torch.arange(len(starts), device=image_ids.device), cu_seqlens.diff().long(),
                                      output_size=n)
    pos = torch.arange(n, device=image_ids.device) - starts[seq_idx]
    end = pos + 1  # causal: up to and including itself
    img = image_ids >= 0
    if bool(img.any()):
        # An image token also sees every token of its image: extend to that image's last position. Ids may be
        # arbitrary, so number the (sequence, image) pairs 0..G-1 instead of indexing by id.
        pairs, group = torch.unique(torch.stack([seq_idx[img], image_ids[img].long()]), dim=1, return_inverse=True)
        last = torch.zeros(pairs.shape[1], dtype=torch.long, device=image_ids.device)
        last.scatter_reduce_(0, group, pos[img] + 1, reduce="amax")
        end[img] = torch.maximum(end[img], last[group])
    return end.to(torch.int32)


def prefill_attention(q, k, v, cu_seqlens, image_ids, scale=None):
    """Triton varlen prefill attention with the causal-or-same-image mask. q [N, Hq, D]; k, v [N, Hkv, D]."""
    require_triton(q)
    _check(q, k, v, cu_seqlens, image_ids)
    n, hq, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    # The kernel assumes unit stride along D; other strides are passed through.
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    cu_seqlens = cu_seqlens.to(device=q.device, dtype=torch.int32).contiguous()
    image_ids = image_ids.to(device=q.device, dtype=torch.int32).contiguous()
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    batch = cu_seqlens.numel() - 1
    if n == 0 or batch == 0:
        return out
    kv_end = _kv_end(cu_seqlens, image_ids)
    max_len = int(cu_seqlens.diff().max())
    block = INTERPRET_BLOCK if _interpreting() else CUDA_BLOCK
    grid = (triton.cdiv(max_len, block), batch, hq)
    _prefill_kernel[grid](
        q, k, v, out, cu_seqlens, image_ids, kv_end,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        scale * 1.4426950408889634, d,  # log2(e): the kernel uses exp2
        GROUP=hq // k.shape[1], BLOCK_M=block, BLOCK_N=block,
        BLOCK_D=max(16, triton.next_power_of_2(d)),  # tl.dot needs every dimension >= 16
        # Triton's CPU interpreter keeps bfloat16 as raw uint16 and its tl.dot multiplies the bit patterns
        # (unsupported there, triton-lang/triton#11584), so it computes in float32 instead.
        UPCAST=_interpreting() and q.dtype == torch.bfloat16,
    )
    return out


def prefill_attention_reference(q, k, v, cu_seqlens, image_ids, scale=None):
    """Plain torch version of `prefill_attention`: one sequence at a time, explicit bool mask, float32 softmax."""
    _check(q, k, v, cu_seqlens, image_ids)
    n, hq, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    group = hq // k.shape[1]
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        if e == s:
            continue
        qs = q[s:e].float().transpose(0, 1)  # [Hq, L, D]
        ks = k[s:e].float().transpose(0, 1).repeat_interleave(group, dim=0)
        vs = v[s:e].float().transpose(0, 1).repeat_interleave(group, dim=0)
        img = image_ids[s:e].to(q.device)
        length = e - s
        causal = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
        same_image = (img[:, None] >= 0) & (img[:, None] == img[None, :])
        scores = (qs @ ks.transpose(1, 2)) * scale
        scores = scores.masked_fill(~(causal | same_image), float("-inf"))
        out[s:e] = (scores.softmax(dim=-1) @ vs).transpose(0, 1).to(q.dtype)
    return out
