"""Triton attention kernels vs their torch references, on CPU through Triton's interpreter.

The references are themselves checked against torch's scaled_dot_product_attention with a dense mask.
Sizes stay tiny (tens of tokens) because the interpreter runs every tile as numpy code.
"""

import os

# Triton picks interpreter or GPU compiler once, when it is first imported, so this must come before that
# import. It holds for the rest of the pytest process.
os.environ["TRITON_INTERPRET"] = "1"

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from attention_inputs import make_paged, make_prefill
from xfusion_kernels import (paged_decode_attention, paged_decode_attention_reference, prefill_attention,
                             prefill_attention_reference)
from xfusion_kernels.prefill import INTERPRET_BLOCK, interpreter_ready

# conftest.py imports transformers, which imports torch._dynamo, which imports triton when installed: if that
# happened before the line above ran, triton is in compiled mode and the kernels cannot run on CPU here.
needs_interpreter = pytest.mark.skipif(
    not interpreter_ready(),
    reason="triton was imported before TRITON_INTERPRET=1 was set; set it at the top of tests/conftest.py "
           "or in the environment",
)

B = INTERPRET_BLOCK  # the kernel's tile length under the interpreter (16): layouts below straddle it
HEADS = [(4, 2, 16), (4, 1, 32), (2, 2, 16)]  # (Hq, Hkv, D): GQA by 2, GQA to one kv head, plain MHA

# Each sequence is a list of (image_id, length) spans; image_id -1 means text.
LAYOUTS = {
    "ragged_text": [[(-1, 1)], [(-1, 5)], [(-1, B)], [(-1, B + 1)]],
    # text, image, text, image, text; ids reused in the second sequence to show they never match across sequences
    "two_images": [[(-1, 3), (0, 6), (-1, 2), (1, 5), (-1, 3)], [(-1, 2), (1, 7), (-1, 1), (0, 4), (-1, 2)]],
    # an image ending exactly on the tile boundary, and one crossing it (a query in tile 0 must reach tile 1)
    "tile_edges": [[(-1, 4), (3, B - 4), (-1, 3)], [(-1, 10), (5, 10), (-1, 1)]],
    # images first and last, a one-token image-only sequence, and one image split by text (ids, not spans, count)
    "image_ends": [[(0, 5), (-1, 3), (1, 4)], [(4, 1)], [(0, 3), (-1, 4), (0, 3), (-1, 2)]],
}


@needs_interpreter
@pytest.mark.parametrize("hq,hkv,d", HEADS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_prefill_matches_reference(layout, hq, hkv, d):
    args = make_prefill(LAYOUTS[layout], hq, hkv, d)
    torch.testing.assert_close(prefill_attention(*args), prefill_attention_reference(*args), atol=1e-4, rtol=1e-4)


@needs_interpreter
def test_prefill_custom_scale_and_strided_inputs():
    q, k, v, cu_seqlens, image_ids = make_prefill(LAYOUTS["two_images"], 4, 2, 16)
    # q, k, v as views into one fused projection output, as a real attention layer produces them
    qkv = torch.cat([q, k, v], dim=1)
    q, k, v = qkv[:, :4], qkv[:, 4:6], qkv[:, 6:]
    assert not q.is_contiguous()
    got = prefill_attention(q, k, v, cu_seqlens, image_ids, scale=0.3)
    want = prefill_attention_reference(q, k, v, cu_seqlens, image_ids, scale=0.3)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@needs_interpreter
@pytest.mark.parametrize("dtype,atol", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_low_precision(dtype, atol):
    args = make_prefill(LAYOUTS["two_images"], 4, 2, 32, dtype=dtype)
    got = prefill_attention(*args)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), prefill_attention_reference(*args).float(), atol=atol, rtol=atol)
    q, k_cache, v_cache, tables, lens, _, _ = make_paged([3, 9], 4, 4, 2, 32, dtype=dtype)
    got = paged_decode_attention(q, k_cache, v_cache, tables, lens)
    assert got.dtype == dtype
    want = paged_decode_attention_reference(q, k_cache, v_cache, tables, lens)
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=atol)


@needs_interpreter
@pytest.mark.parametrize("hq,hkv,d", HEADS)
@pytest.mark.parametrize("block_size", [4, 8])
def test_decode_matches_reference(block_size, hq, hkv, d):
    # one short of a block, exactly one, one over, several blocks plus a partial one, a single token
    lens = [block_size - 1, block_size, block_size + 1, 3 * block_size + 2, 1]
    q, k_cache, v_cache, tables, seq_lens, _, _ = make_paged(lens, block_size, hq, hkv, d)
    got = paged_decode_attention(q, k_cache, v_cache, tables, seq_lens)
    assert not got.isnan().any()
    torch.testing.assert_close(got, paged_decode_attention_reference(q, k_cache, v_cache, tables, seq_lens),
                               atol=1e-4, rtol=1e-4)


@needs_interpreter
def test_non_power_of_two_sizes():
    # head_dim 24 and block_size 6 are padded to 32 and 8 inside the kernels
    args = make_prefill(LAYOUTS["tile_edges"], 4, 2, 24)
    torch.testing.assert_close(prefill_attention(*args), prefill_attention_reference(*args), atol=1e-4, rtol=1e-4)
    q, k_cache, v_cache, tables, lens, _, _ = make_paged([5, 6, 7, 13], 6, 4, 2, 24)
    torch.testing.assert_close(paged_decode_attention(q, k_cache, v_cache, tables, lens),
                               paged_decode_attention_reference(q, k_cache, v_cache, tables, lens), atol=1e-4, rtol=1e-4)


@needs_interpreter
def test_decode_empty_sequence_gives_zeros():
    q, k_cache, v_cache, tables, lens, _, _ = make_paged([0, 5], 4, 2, 2, 16)
    for fn in (paged_decode_attention, paged_decode_attention_reference):
        out = fn(q, k_cache, v_cache, tables, lens)
        assert out[0].eq(0).all() and not out[1].isnan().any()


@pytest.mark.parametrize("layout", ["two_images", "image_ends"])
def test_prefill_reference_matches_dense_sdpa(layout):
    q, k, v, cu_seqlens, image_ids = make_prefill(LAYOUTS[layout], 4, 2, 16)
    # One dense [N, N] mask over the packed batch, built independently of the per-sequence reference loop.
    seq = torch.repeat_interleave(torch.arange(len(cu_seqlens) - 1), cu_seqlens.diff())
    i, j = torch.arange(len(seq))[:, None], torch.arange(len(seq))[None, :]
    same_image = (image_ids[:, None] >= 0) & (image_ids[:, None] == image_ids[None, :])
    mask = (seq[:, None] == seq[None, :]) & ((j <= i) | same_image)
    dense = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1).repeat_interleave(2, dim=0),
                                           v.transpose(0, 1).repeat_interleave(2, dim=0), attn_mask=mask)
    torch.testing.assert_close(prefill_attention_reference(q, k, v, cu_seqlens, image_ids), dense.transpose(0, 1),
                               atol=1e-5, rtol=1e-5)


def test_decode_reference_matches_dense_sdpa():
    q, k_cache, v_cache, tables, lens, keys, values = make_paged([3, 4, 5, 14], 4, 4, 1, 16)
    ref = paged_decode_attention_reference(q, k_cache, v_cache, tables, lens)
    for b, (ks, vs) in enumerate(zip(keys, values)):  # the unpaged K/V the cache was filled from
        dense = F.scaled_dot_product_attention(q[b][:, None], ks.transpose(0, 1).expand(4, -1, -1),
                                               vs.transpose(0, 1).expand(4, -1, -1))
        torch.testing.assert_close(ref[b], dense[:, 0], atol=1e-5, rtol=1e-5)


def test_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="Triton is unavailable"):
        prefill_attention(*make_prefill(LAYOUTS["ragged_text"], 2, 2, 16))
    q, k_cache, v_cache, tables, lens, _, _ = make_paged([3], 4, 2, 2, 16)
    with pytest.raises(RuntimeError, match="Triton is unavailable"):
        paged_decode_attention(q, k_cache, v_cache, tables, lens)


def test_package_imports_without_triton():
    # Blocking the module makes `import triton` fail as it would where triton is not installed.
    code = """
import sys
sys.modules["triton"] = None
import torch, xfusion_kernels
q = torch.randn(3, 2, 16)
args = (q, q, q, torch.tensor([0, 3], dtype=torch.int32), torch.full((3,), -1, dtype=torch.int32))
xfusion_kernels.prefill_attention_reference(*args)
try:
    xfusion_kernels.prefill_attention(*args)
except RuntimeError as e:
    assert "Triton is unavailable" in str(e)
else:
    raise AssertionError("expected RuntimeError")
"""
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "TRITON_INTERPRET": "1"})
