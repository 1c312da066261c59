"""The project's CPU matrix multiply (xfusion::cpu_linear) against torch's F.linear (MKL), on the weights of one
whole decode step of a model shape: every block's fused q/k/v, o, gate/up and down, and the LM head. torch runs
twice: on the weights as loaded ([out, in]) and with the block weights stored [in, out] (a transposed view; the
LM head, an embedding too when tied, as loaded), as the engine stores them for torch's multiply on the CPU
(llama.fuse_linears).

    python benchmarks/bench_cpu_linear.py [--layers 30 --hidden 576 --heads 9 --kv-heads 3 --intermediate 1536
        --vocab 49152] [--rows 1,4,16,64] [--repeats 5] [--against REV]

`--against REV`: the kernel as it is here against its source at git revision REV (built beside it under another
op name), alternated pass by pass: the median of `--repeats` pairs each, and of their ratios, instead of torch.

Defaults: the 135M-class Llama of benchmarks/make_checkpoint.py's smol-135m preset; the embedded demo's text tower
is `--layers 4 --hidden 128 --heads 4 --kv-heads 2 --intermediate 352 --vocab 562`. Random float32 weights; the
figure is the best of `--repeats` passes over all matrices (ms per decode step's multiplies), interleaved.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernels"))
from kernel_at import alternate, kernel_at  # noqa: E402
from xfusion_kernels.cpu import cpu_linear  # noqa: E402


def weights(a: argparse.Namespace) -> list[torch.Tensor]:
    head = a.hidden // a.heads
    per_layer = [((a.heads + 2 * a.kv_heads) * head, a.hidden), (a.hidden, a.hidden),
                 (2 * a.intermediate, a.hidden), (a.hidden, a.intermediate)]
    shapes = per_layer * a.layers + [(a.vocab, a.hidden)]
    return [torch.randn(*s) * 0.02 for s in shapes]


def step_ms(fn, ws: list[torch.Tensor], rows: int) -> float:
    xs = {w.shape[1]: torch.randn(rows, w.shape[1]) for w in ws}
    start = time.perf_counter()
    for w in ws:
        fn(xs[w.shape[1]], w)
    return (time.perf_counter() - start) * 1e3


def against(op, ref, ws: list[torch.Tensor], rows_list: list[int], repeats: int, rev: str) -> None:
    print(f"{'rows':>5} {'ours ms':>9} {rev + ' ms':>12} {'ratio of medians':>17} {'median of ratios':>17}")
    for rows in rows_list:
        ours, theirs, ratio = alternate(lambda: step_ms(op, ws, rows), lambda: step_ms(ref, ws, rows), repeats)
        print(f"{rows:>5} {ours:>9.3f} {theirs:>12.3f} {theirs / ours:>16.2f}x {ratio:>16.2f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in [("layers", 30), ("hidden", 576), ("heads", 9), ("kv-heads", 3), ("intermediate", 1536),
                          ("vocab", 49152), ("repeats", 5)]:
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--rows", default="1,4,16,64")
    p.add_argument("--against", metavar="REV", help="the kernel at this git revision instead of torch")
    a = p.parse_args()
    op = cpu_linear()
    if op is None:
        sys.exit("the kernel could not be built here (see the warning above)")
    ws = weights(a)
    if a.against:
        print(f"{sum(w.numel() for w in ws) / 1e6:.1f}M float32 weights, torch threads {torch.get_num_threads()}; "
              f"ratios > 1: ours faster")
        ref = kernel_at(a.against, "cpu_linear.cpp", "cpu_linear")
        against(op, ref, ws, list(map(int, a.rows.split(","))), a.repeats, a.against)
        return
    ws_in_out = [w.t().contiguous().t() for w in ws[:-1]] + ws[-1:]
    print(f"{sum(w.numel() for w in ws) / 1e6:.1f}M float32 weights, torch threads {torch.get_num_threads()}")
    print(f"{'rows':>5} {'ours ms':>9} {'torch ms':>9} {'torch [in,out] ms':>18} {'torch/ours':>11} "
          f"{'torch [in,out]/ours':>20}")
    for rows in map(int, a.rows.split(",")):
        ours, theirs, transposed = float("inf"), float("inf"), float("inf")
        for _ in range(a.repeats):  # interleaved: the machine's drift hits all alike
            ours = min(ours, step_ms(op, ws, rows))
            theirs = min(theirs, step_ms(F.linear, ws, rows))
            transposed = min(transposed, step_ms(F.linear, ws_in_out, rows))
        print(f"{rows:>5} {ours:>9.3f} {theirs:>9.3f} {transposed:>18.3f} {theirs / ours:>10.2f}x "
              f"{transposed / ours:>19.2f}x")


if __name__ == "__main__":
    main()
