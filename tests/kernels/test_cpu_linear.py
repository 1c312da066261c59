"""The CPU matrix multiply for few rows (kernels/xfusion_kernels/cpu_linear.cpp) against float64 arithmetic,
its hand-offs to torch's linear, under torch.compile, and the engine's switch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from xfusion_kernels.cpu import cpu_linear

op = cpu_linear()
pytestmark = pytest.mark.skipif(op is None, reason="no C++ compiler: the engine falls back to torch's linear")


def exact(x, w, b=None):
    y = x.double() @ w.double().T
    return (y + b.double() if b is not None else y).float()


def close_as_torch(got, x, w, b=None):
    """Within twice the error torch's own float32 linear makes against float64 (plus a floor)."""
    ref = exact(x, w, b)
    torch_err = (F.linear(x, w, b) - ref).abs().max().item()
    assert (got - ref).abs().max().item() <= 2 * torch_err + 1e-5


@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 7, 8, 16, 17, 48, 49, 50, 63, 64])  # strided tiles up to 48 rows
@pytest.mark.parametrize("N, K", [(1, 16), (3, 32), (4, 32), (5, 576), (7, 64), (575, 576), (576, 1536), (130, 48)])
def test_matches_float64(M, N, K):
    g = torch.Generator().manual_seed(M * 1000 + N + K)
    x, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g)
    got = op(x, w)
    assert got.shape == (M, N) and got.dtype == torch.float32
    close_as_torch(got, x, w)


def test_bias_leading_dims_and_strided_input():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 96, generator=g)
    w, b = torch.randn(40, 64, generator=g), torch.randn(40, generator=g)
    strided = x[..., 16:80]  # rows not contiguous with each other
    got = op(strided, w, b)
    assert got.shape == (2, 3, 40)
    close_as_torch(got.reshape(6, 40), strided.reshape(6, 64), w, b)


@pytest.mark.parametrize("case", ["many rows", "K not a multiple of 16", "bfloat16"])
def test_hands_off_to_torch_where_it_does_not_apply(case):
    g = torch.Generator().manual_seed(1)
    x, w = {"many rows": (torch.randn(65, 32, generator=g), torch.randn(8, 32, generator=g)),
            "K not a multiple of 16": (torch.randn(3, 20, generator=g), torch.randn(8, 20, generator=g)),
            "bfloat16": (torch.randn(3, 32, generator=g).bfloat16(), torch.randn(8, 32, generator=g).bfloat16())}[case]
    assert torch.equal(op(x, w), F.linear(x, w))


def test_one_op_in_a_whole_compiled_graph():
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(4, 64, generator=g), torch.randn(24, 64, generator=g)
    compiled = torch.compile(lambda x, w: op(x, w).relu(), fullgraph=True)  # a graph break raises
    torch.testing.assert_close(compiled(x, w), op(x, w).relu())


def test_the_engine_switch(checkpoint_dir, monkeypatch):
    import xfusion_serve.engine.runner as runner_module
    from xfusion_serve import Engine, EngineConfig, load_checkpoint

    def engine(**kw) -> Engine:
        return Engine(load_checkpoint(checkpoint_dir), EngineConfig(kv_cache_memory=1 << 20, **kw))

    on = engine()  # by default on for float32 on the CPU, whatever the model's size (this one is tiny)
    assert on.config.cpu_kernels and on.runner.model.text.matmul is op
    assert all(b.mlp.matmul is op and b.self_attn.matmul is op for b in on.runner.model.vision.layers)
    block = on.runner.model.text.model.layers[0]
    assert block.mlp.down_proj.weight.is_contiguous()  # [out, in], as the kernel reads it
    off = engine(cpu_kernels=False)
    assert off.runner.model.text.matmul is F.linear
    block = off.runner.model.text.model.layers[0]
    assert block.mlp.down_proj.weight.t().is_contiguous()  # [in, out] in memory, for MKL's "NN" multiply
    monkeypatch.setattr(runner_module, "cpu_linear", lambda: None)  # asked for, but it cannot be built here
    unbuilt = engine(cpu_kernels=True)
    assert unbuilt.runner.model.text.matmul is F.linear
    assert unbuilt.runner.model.text.model.layers[0].mlp.down_proj.weight.t().is_contiguous()  # laid out for MKL
    assert not EngineConfig(dtype="bfloat16").cpu_kernels
    with pytest.raises(ValueError, match="cpu_kernels"):
        EngineConfig(device="cuda", cpu_kernels=True)


def test_the_engine_with_it_still_answers_as_transformers(random_checkpoint_dir):
    """Greedy chat through the kernel, batched and paged, token for token transformers' generate (up to the
    first stop id, 3 or 4, which ends the engine's answer)."""
    from transformers import LlamaForCausalLM

    from xfusion_serve import Engine, EngineConfig, SamplingParams, load_checkpoint

    engine = Engine(load_checkpoint(random_checkpoint_dir), EngineConfig(block_size=4, cpu_kernels=True))
    prompts = [[2, 7, 9, 11, 5], [2, 30, 31], [2] + list(range(40, 60))]
    reqs = [engine.requests[engine.add_text(p, SamplingParams(max_tokens=16))] for p in prompts]
    engine.run([r.id for r in reqs])
    hf = LlamaForCausalLM.from_pretrained(random_checkpoint_dir / "text_tower", dtype=torch.float32).eval()
    for p, r in zip(prompts, reqs):
        expected = hf.generate(torch.tensor([p]), max_new_tokens=16, do_sample=False, pad_token_id=1)[0, len(p):]
        stop = next((i for i, t in enumerate(expected.tolist()) if t in (3, 4)), len(expected))
        assert r.output == expected[:stop].tolist()
