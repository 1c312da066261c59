"""The attention backends behind the one switch agree with torch's: the project's Triton kernels through
the engine, and flash-attn's paged decode as the custom op that lets torch.compile keep the decode step
whole (flash-attn itself needs a GPU: a stand-in with its documented semantics takes its place here)."""

from __future__ import annotations

import importlib.machinery
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from test_engine import PROMPTS, assert_all_free, make_engine, run_text

from attention_inputs import make_prefill
from xfusion_kernels import prefill_attention_reference

from xfusion_serve import SamplingParams
from xfusion_serve.demo.shapes import sample as shape_sample
from xfusion_serve.model.attention import FlashAttnBackend, TorchBackend


# Sequences of (image id, length) spans, -1 text, packed into one prefill: text alone (causal, one token too), an
# image between texts, an image first and one split by text, and text beside image sequences in one batch.
PREFILL_LAYOUTS = [
    [[(-1, 1)], [(-1, 7)], [(-1, 37)]],
    [[(-1, 3), (0, 6), (-1, 2)], [(-1, 9)], [(1, 4), (-1, 3), (1, 4)], [(-1, 5)]],
    [[(0, 1)], [(-1, 2), (3, 5)]],
]


@pytest.mark.parametrize("hq,hkv", [(4, 2), (4, 1), (2, 2)])
@pytest.mark.parametrize("layout", PREFILL_LAYOUTS)
def test_torch_prefill_matches_reference(layout, hq, hkv):
    """The torch backend's packed prefill (fused SDPA: causal for text alone, the modality mask where there is
    an image) against the kernels' plain reference: one sequence at a time, an explicit mask, float32."""
    q, k, v, cu_seqlens, image_ids = make_prefill(layout, hq, hkv, 16)
    backend = TorchBackend()
    out = backend.prefill(q, k, v, backend.prepare_prefill(cu_seqlens.tolist(), image_ids.long()))
    torch.testing.assert_close(out, prefill_attention_reference(q, k, v, cu_seqlens, image_ids), atol=1e-5,
                               rtol=1e-5)


def test_triton_backend_agrees_with_torch(random_checkpoint_dir):
    pytest.importorskip("triton")
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    torch_engine, triton_engine = make_engine(random_checkpoint_dir, attention_backend="torch"), make_engine(
        random_checkpoint_dir, attention_backend="triton")
    assert run_text(triton_engine, PROMPTS, params) == run_text(torch_engine, PROMPTS, params)
    image = shape_sample(2, 1)[1]
    assert triton_engine.caption([image], params=params) == torch_engine.caption([image], params=params)
    assert_all_free(triton_engine)


def flash_attn_stand_in() -> types.ModuleType:
    """flash_attn_with_kvcache as flash-attn documents it, for a cache given as blocks: q [B, 1, Hq, d],
    k/v_cache [blocks, block_size, Hkv, d], the first cache_seqlens[b] tokens of block_table[b]'s blocks."""

    def flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens, block_table):
        out = torch.empty_like(q)
        for b, (n, blocks) in enumerate(zip(cache_seqlens.tolist(), block_table.long())):
            k, v = (c[blocks].flatten(0, 1)[:n].transpose(0, 1) for c in (k_cache, v_cache))
            out[b, 0] = F.scaled_dot_product_attention(q[b, 0][:, None], k, v, enable_gqa=True)[:, 0]
        return out

    module = types.ModuleType("flash_attn")
    module.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)
    module.flash_attn_with_kvcache, module.flash_attn_varlen_func = flash_attn_with_kvcache, None
    return module


def test_flash_attn_decode_is_one_op_in_a_whole_compiled_graph(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", flash_attn_stand_in())
    flash, torch_backend = FlashAttnBackend(), TorchBackend()
    g = torch.Generator().manual_seed(0)
    kv = torch.randn(2, 6, 4, 2, 8, generator=g)  # [k/v, blocks, block_size, Hkv, d]
    q = torch.randn(3, 4, 8, generator=g)  # GQA: 4 query heads over 2
    tables = torch.tensor([[1, 2], [3, 0], [4, 5]], dtype=torch.int32)  # ragged: the second uses one block
    seq_lens = torch.tensor([7, 3, 8], dtype=torch.int32)

    def step(q, kv, tables, seq_lens):  # flash-attn reads the new token's K/V from the cache
        return flash.decode(q, kv, flash.prepare_decode(tables, seq_lens, 4), None, None)

    out = torch.compile(step, fullgraph=True)(q, kv, tables, seq_lens)  # fullgraph: a graph break raises
    # The torch backend takes the new token's K/V as arguments: here, what sits at position seq_len - 1.
    last = [kv[:, t[(n - 1) // 4], (n - 1) % 4] for t, n in zip(tables.long(), seq_lens.tolist())]
    k_new, v_new = torch.stack(last, 1)
    expected = torch_backend.decode(q, kv, torch_backend.prepare_decode(tables.long(), seq_lens.long(), 4), k_new,
                                    v_new)
    torch.testing.assert_close(out, expected)
