"""The project's CPU decode attention (the "cpu" backend, xfusion::cpu_paged_decode) against the "torch" backend
(gather the blocks, append the new token, masked SDPA), on one whole decode step's attention of a model shape:
every layer, each sequence holding `--context` cached tokens in scattered blocks of a paged pool.

    python benchmarks/bench_cpu_attention.py [--layers 4 --heads 4 --kv-heads 2 --head-dim 32] [--rows 1,16,64]
        [--context 64,512] [--repeats 5] [--against REV]

`--against REV`: the kernel as it is here against its source at git revision REV (built beside it under another
op name), alternated pass by pass: the median of `--repeats` pairs each, and of their ratios, instead of torch.

Defaults: the embedded demo's text tower. `--layers 30 --heads 9 --kv-heads 3 --head-dim 64`: the 135M-class
shape of benchmarks/make_checkpoint.py. Random float32 values; each figure is the best of `--repeats` passes
(ms per decode step's attention, the per-step metadata included), the two backends interleaved.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch
from kernel_at import alternate, kernel_at

from xfusion_serve.model.attention import CpuBackend, TorchBackend, cpu_backend_problem

BLOCK = 16


def inputs(a: argparse.Namespace, rows: int, context: int) -> tuple:
    need = math.ceil(context / BLOCK)
    pool = torch.randn(a.layers, 2, rows * need + 1, BLOCK, a.kv_heads, a.head_dim)
    order = torch.randperm(rows * need) + 1  # scattered blocks, as a busy pool hands them out
    tables = order.view(rows, need).to(torch.int32)
    seq_lens = torch.full((rows,), context + 1, dtype=torch.int32)  # the cached tokens and the new one
    # as the model hands them over: head-major views of token-major tensors (engine/paged_attention.py)
    q = torch.randn(a.layers, a.heads, rows, a.head_dim).transpose(1, 2)
    kv = torch.randn(a.layers, 2, a.kv_heads, rows, a.head_dim).transpose(2, 3)
    return pool, tables, seq_lens, q, kv


def step_ms(backend, pool, tables, seq_lens, q, kv) -> float:
    start = time.perf_counter()
    meta = backend.prepare_decode(tables, seq_lens, BLOCK)
    for layer in range(len(pool)):
        backend.decode(q[layer], pool[layer], meta, kv[layer, 0], kv[layer, 1])
    return (time.perf_counter() - start) * 1e3


def against(ours: CpuBackend, ref: CpuBackend, a: argparse.Namespace) -> None:
    print(f"ratios > 1: ours faster\n{'rows':>5} {'context':>8} {'ours ms':>8} {a.against + ' ms':>12} "
          f"{'ratio of medians':>17} {'median of ratios':>17}")
    for rows in map(int, a.rows.split(",")):
        for context in map(int, a.context.split(",")):
            args = inputs(a, rows, context)
            mine, theirs, ratio = alternate(lambda: step_ms(ours, *args), lambda: step_ms(ref, *args), a.repeats)
            print(f"{rows:>5} {context:>8} {mine:>8.3f} {theirs:>12.3f} {theirs / mine:>16.2f}x {ratio:>16.2f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in [("layers", 4), ("heads", 4), ("kv-heads", 2), ("head-dim", 32), ("repeats", 5)]:
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--rows", default="1,16,64")
    p.add_argument("--context", default="64,512")
    p.add_argument("--against", metavar="REV", help="the kernel at this git revision instead of torch")
    a = p.parse_args()
    if (problem := cpu_backend_problem(torch.device("cpu"), torch.float32, a.head_dim)) is not None:
        sys.exit(f"the cpu backend cannot run here: {problem}")
    from xfusion_kernels.cpu import cpu_paged_decode

    ours, reference = CpuBackend(cpu_paged_decode()), TorchBackend()
    print(f"{a.layers} layers, {a.heads} query / {a.kv_heads} KV heads of {a.head_dim}, torch threads "
          f"{torch.get_num_threads()}")
    if a.against:
        against(ours, CpuBackend(kernel_at(a.against, "cpu_attention.cpp", "cpu_paged_decode")), a)
        return
    print(f"{'rows':>5} {'context':>8} {'cpu ms':>8} {'torch ms':>9} {'torch/cpu':>10}")
    for rows in map(int, a.rows.split(",")):
        for context in map(int, a.context.split(",")):
            args = inputs(a, rows, context)
            best = {"cpu": float("inf"), "torch": float("inf")}
            for _ in range(a.repeats):  # interleaved: the machine's drift hits both alike
                best["cpu"] = min(best["cpu"], step_ms(ours, *args))
                best["torch"] = min(best["torch"], step_ms(reference, *args))
            print(f"{rows:>5} {context:>8} {best['cpu']:>8.2f} {best['torch']:>9.2f} "
                  f"{best['torch'] / best['cpu']:>9.2f}x")


if __name__ == "__main__":
    main()
