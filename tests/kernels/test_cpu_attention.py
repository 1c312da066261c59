"""The CPU paged decode attention (kernels/xfusion_kernels/cpu_attention.cpp) against float64 attention written
out token by token here, its errors, under torch.compile, and the engine's switch ("cpu" backend)."""

from __future__ import annotations

import math

import pytest
import torch
from xfusion_kernels.cpu import cpu_paged_decode

from xfusion_serve.model.attention import CpuBackend, TorchBackend

op = cpu_paged_decode()
pytestmark = pytest.mark.skipif(op is None, reason="no C++ compiler: the engine falls back to the torch backend")


def case(B=4, Hq=4, Hkv=2, d=32, bs=4, blocks=12, lens=(1, 4, 5, 11), seed=0):
    """A pool of `blocks`, ragged tables of distinct blocks (padded with 0), seq_lens counting the new token."""
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(2, blocks, bs, Hkv, d, generator=g)
    q, k, v = torch.randn(B, Hq, d, generator=g), torch.randn(B, Hkv, d, generator=g), torch.randn(B, Hkv, d, generator=g)
    order = torch.randperm(blocks, generator=g).tolist()
    width = max(math.ceil((n - 1) / bs) for n in lens) or 1
    tables = []
    for n in lens:
        used = [order.pop() for _ in range(math.ceil((n - 1) / bs))]
        tables.append(used + [0] * (width - len(used)))
    return q, kv, torch.tensor(tables, dtype=torch.int32), torch.tensor(lens, dtype=torch.int32), k, v


def exact(q, kv, tables, lens, k, v):
    """Attention in float64, the cached keys looked up one token at a time by block table."""
    B, Hq, d = q.shape
    Hkv, bs = kv.shape[3], kv.shape[2]
    out = torch.empty(B, Hq, d, dtype=torch.float64)
    for b in range(B):
        n = int(lens[b])
        rows = [(int(tables[b, t // bs]), t % bs) for t in range(n - 1)]
        keys = torch.stack([kv[0, blk, i] for blk, i in rows] + [k[b]]).double()  # [n, Hkv, d]
        values = torch.stack([kv[1, blk, i] for blk, i in rows] + [v[b]]).double()
        for h in range(Hq):
            kvh = h // (Hq // Hkv)
            p = torch.softmax(keys[:, kvh] @ q[b, h].double() / math.sqrt(d), 0)
            out[b, h] = p @ values[:, kvh]
    return out


def reference(q, kv, tables, lens, k, v):
    backend = TorchBackend()
    return backend.decode(q, kv, backend.prepare_decode(tables, lens, kv.shape[2]), k, v)


@pytest.mark.parametrize("Hq, Hkv, d", [(4, 2, 32), (2, 2, 16), (9, 3, 64), (8, 1, 128), (4, 4, 48), (2, 1, 144)])
@pytest.mark.parametrize("lens", [(1, 1, 1, 1), (1, 4, 5, 11), (9, 13, 2, 40), (77, 1, 130, 34)])
@pytest.mark.parametrize("sharpness", [1.0, 40.0])
def test_matches_float64(Hq, Hkv, d, lens, sharpness):
    """Ragged lengths around the kernel's groups of 4 tokens, its pairs of tokens in the weighted sum, its
    16-token vectors and its read-ahead; heads of 1 to 8 vectors (the sums in registers) and of 9 (in memory);
    queries scaled so that most scores lie hundreds below the maximum (exp far under float32's range)."""
    q, *rest = case(Hq=Hq, Hkv=Hkv, d=d, lens=lens, blocks=120, seed=Hq * 100 + d + sum(lens))
    args = (q * sharpness, *rest)
    got = op(*args)
    assert got.shape == args[0].shape and got.dtype == torch.float32
    want = exact(*args)
    torch_err = (reference(*args).double() - want).abs().max().item()
    # Scores sharpness times larger carry sharpness times larger rounding errors (in float32, torch's too).
    assert (got.double() - want).abs().max().item() <= 2 * torch_err + 1e-6 * sharpness


def test_strided_inputs_as_the_engine_passes_them():
    q, kv, tables, lens, k, v = case()
    # the model's q/k/v arrive as head-major views of token-major tensors
    qt, kt, vt = (x.transpose(0, 1).contiguous().transpose(0, 1) for x in (q, k, v))
    assert not qt.is_contiguous()
    torch.testing.assert_close(op(qt, kv, tables, lens, kt, vt), op(q, kv, tables, lens, k, v))


def test_reads_nothing_past_a_sequence_or_outside_its_table():
    q, kv, tables, lens, k, v = case(lens=(3, 6, 2, 9))
    before = op(q, kv, tables, lens, k, v)
    poisoned = kv.clone()
    used = {(int(tables[b, t // 4]), t % 4) for b in range(4) for t in range(int(lens[b]) - 1)}
    for blk in range(kv.shape[1]):
        for i in range(4):
            if (blk, i) not in used:
                poisoned[:, blk, i] = float("nan")
    assert torch.equal(op(q, poisoned, tables, lens, k, v), before)


@pytest.mark.parametrize("bad, message", [
    (lambda a: (a[0].double(), *a[1:]), "float32"),
    (lambda a: (*a[:2], a[2].long(), *a[3:]), "int32"),
    (lambda a: (*a[:2], torch.full_like(a[2], 99), *a[3:]), "block id"),
    (lambda a: (*a[:3], a[3] + 20, *a[4:]), "seq_lens"),
    (lambda a: (*a[:3], torch.zeros_like(a[3]), *a[4:]), "seq_lens"),
    (lambda a: (*a[:4], a[4][:, :1], a[5][:, :1]), "k and v"),
    (lambda a: (a[0][:, None], *a[1:]), "3-D"),
    (lambda a: (a[0], a[1][:, :, :, :0], *a[2:]), "multiple of KV heads"),
])
def test_bad_input_raises_a_clear_error(bad, message):
    with pytest.raises(RuntimeError, match=message):
        op(*bad(case()))


def test_one_op_in_a_whole_compiled_graph():
    args = case()
    compiled = torch.compile(lambda q, *rest: op(q, *rest).relu(), fullgraph=True)  # a graph break raises
    torch.testing.assert_close(compiled(*args), op(*args).relu())


def test_the_engine_switch(checkpoint_dir):
    from test_engine import PROMPTS, assert_all_free, make_engine, run_text

    from xfusion_serve import EngineConfig, SamplingParams
    from xfusion_serve.demo.shapes import sample as shape_sample

    default, torch_engine = make_engine(checkpoint_dir), make_engine(checkpoint_dir, attention_backend="torch")
    assert default.config.attention_backend == "cpu" and isinstance(default.runner.backend, CpuBackend)
    assert type(torch_engine.runner.backend) is TorchBackend
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    assert run_text(default, PROMPTS, params) == run_text(torch_engine, PROMPTS, params)
    image = shape_sample(2, 1)[1]
    assert default.caption([image], params=params) == torch_engine.caption([image], params=params)
    assert_all_free(default)
    assert EngineConfig(dtype="bfloat16").attention_backend == "torch"
    with pytest.raises(ValueError, match="cpu needs device cpu and dtype float32"):
        EngineConfig(dtype="bfloat16", attention_backend="cpu")


def test_a_head_size_it_cannot_serve(tmp_path, vae_dir):
    from conftest import make_text_tower
    from test_engine import make_engine

    from xfusion_serve.model.checkpoint import init_checkpoint

    tower = make_text_tower(tmp_path / "llama", hidden=40)  # 4 heads of 10
    ckpt = init_checkpoint(tower, vae_dir, tmp_path / "ckpt", image_sizes=[(16, 16)])
    assert make_engine(ckpt).config.attention_backend == "torch"  # the default falls back, with a warning
    with pytest.raises(ValueError, match="multiple of 16, not 10"):
        make_engine(ckpt, attention_backend="cpu")


def test_a_lock_left_by_a_killed_build_is_removed_and_a_live_one_kept(tmp_path, monkeypatch):
    """torch waits forever on another build's lock: one older than any build is a killed build's."""
    import os
    import time

    import torch.utils.cpp_extension as cpp_extension
    from xfusion_kernels import cpu

    monkeypatch.setattr(cpp_extension, "_get_build_directory", lambda name, verbose: str(tmp_path / name))
    for name, age in (("killed", cpu.STALE_LOCK_S + 60), ("building", 5)):
        (tmp_path / name).mkdir()
        lock = tmp_path / name / "lock"
        lock.touch()
        os.utime(lock, (time.time() - age, time.time() - age))
        cpu._clear_stale_lock(name)
    assert not (tmp_path / "killed" / "lock").exists() and (tmp_path / "building" / "lock").exists()
    cpu._clear_stale_lock("never built")  # no directory, no lock: nothing to do
