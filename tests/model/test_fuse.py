"""XFusionModel.fuse_projections: q/k/v and gate/up as one weight each, optionally every block weight stored
[in, out]; the same parameters (names, shapes, values), no memory added, the same outputs."""

from __future__ import annotations

import copy

import pytest
import torch

from xfusion_serve import Engine, EngineConfig, load_checkpoint
from xfusion_serve.model.llama import Block


def storage_bytes(model: torch.nn.Module) -> int:
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    return sum(storages.values())


def blocks(model) -> list[Block]:
    return [*model.text.model.layers, *model.vision.layers]


def block_weights(block: Block) -> list[torch.Tensor]:
    attn, mlp = block.self_attn, block.mlp
    return [attn.qkv_weight, attn.o_proj.weight, mlp.gate_up_weight, mlp.down_proj.weight]


@pytest.mark.parametrize("transposed", [False, True])
def test_fused_blocks_keep_their_parameters_and_outputs(checkpoint_dir, transposed):
    model = load_checkpoint(checkpoint_dir, load_vae=False).model
    reference = copy.deepcopy(model)
    before, nbytes = {n: p.detach().clone() for n, p in model.named_parameters()}, storage_bytes(model)

    model.fuse_projections(transposed=transposed)

    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    assert all(torch.equal(after[n], p) for n, p in before.items())
    assert storage_bytes(model) == nbytes  # views into the fused weights: no copy kept
    torch.manual_seed(0)
    for block, ref in zip(blocks(model), blocks(reference)):
        attn = block.self_attn
        for w in block_weights(block):
            assert w.t().is_contiguous() if transposed else w.is_contiguous()  # how its memory is laid out
        for part in (attn.q_proj, attn.k_proj, attn.v_proj):  # views into the one weight
            assert part.weight.untyped_storage().data_ptr() == attn.qkv_weight.untyped_storage().data_ptr()
        x = torch.randn(5, block.input_layernorm.weight.shape[0])
        cos, sin = torch.ones(1, 5, attn.head_dim), torch.zeros(1, 5, attn.head_dim)
        for got, want in zip(attn.project(x, cos, sin), ref.self_attn.project(x, cos, sin)):
            torch.testing.assert_close(got, want)
        torch.testing.assert_close(block.mlp(x), ref.mlp(x))
        attn_out = torch.randn(5, attn.heads, attn.head_dim)
        torch.testing.assert_close(block.finish(x, attn_out), ref.finish(x, attn_out))


def test_the_engine_stores_block_weights_transposed_for_torchs_multiply_alone(checkpoint_dir):
    """On the CPU in float32, torch's (MKL's) few-row multiplies are faster on [in, out] weights; the project's
    kernel (cpu_kernels) reads them [out, in], and in bfloat16 oneDNN is faster on them as loaded."""
    torchs = Engine(load_checkpoint(checkpoint_dir), EngineConfig(block_size=4, cpu_kernels=False))
    assert all(w.t().is_contiguous() for b in blocks(torchs.runner.model) for w in block_weights(b))
    for config in (EngineConfig(block_size=4, cpu_kernels=True), EngineConfig(block_size=4, dtype="bfloat16")):
        engine = Engine(load_checkpoint(checkpoint_dir, dtype=config.dtype), config)
        assert all(w.is_contiguous() for b in blocks(engine.runner.model) for w in block_weights(b))
