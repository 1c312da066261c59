"""A C++ kernel of the project as it was at a git revision, built beside the one here so that a benchmark can
alternate the two in one process (`--against REV` of bench_cpu_linear.py and bench_cpu_attention.py)."""

from __future__ import annotations

import platform
import re
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def kernel_at(rev: str, source: str, op: str):
    """-> torch.ops.xfusion_ref.<op>, from kernels/xfusion_kernels/<source> (and cpu_vec.h, where that revision
    has it) as they were at git revision `rev`, built with the flags of xfusion_kernels/cpu.py under the op
    namespace xfusion_ref. Raises SystemExit where git cannot show the source or it registers its op otherwise."""
    from torch.utils.cpp_extension import load

    sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", rev], capture_output=True, text=True)
    if sha.returncode:
        sys.exit(f"not a git revision here: {rev}")
    name = f"xfusion_{Path(source).stem}_ref_{sha.stdout.strip()}"
    folder = Path(tempfile.gettempdir()) / name  # the same sources in the same place: torch's cached build serves
    folder.mkdir(exist_ok=True)
    for file in (source, "cpu_vec.h"):
        shown = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:kernels/xfusion_kernels/{file}"],
                               capture_output=True, text=True)
        if shown.returncode and file.endswith(".h"):
            continue
        if shown.returncode:
            sys.exit(f"git cannot show {file} at {rev}: {shown.stderr.strip()}")
        text = shown.stdout
        if file == source:  # its own op namespace, so that both builds load into this process
            text, defs = re.subn(r"TORCH_LIBRARY(_FRAGMENT)?\(xfusion,", "TORCH_LIBRARY(xfusion_ref,", text)
            text, impls = re.subn(r"TORCH_LIBRARY_IMPL\(xfusion,", "TORCH_LIBRARY_IMPL(xfusion_ref,", text)
            if not (defs and impls):
                sys.exit(f"{source} at {rev} registers its op otherwise: cannot build it beside this one")
        (folder / file).write_text(text)
    arch = "-march=native" if platform.machine() in ("x86_64", "AMD64", "i686") else "-mcpu=native"  # as cpu.py
    load(name=name, sources=[str(folder / source)], extra_cflags=["-O3", "-fopenmp", arch],
         extra_ldflags=["-fopenmp"], is_python_module=False)
    return getattr(torch.ops.xfusion_ref, op)


def alternate(ours: Callable[[], float], theirs: Callable[[], float], repeats: int) -> tuple[float, float, float]:
    """Times both (each call -> its ms), alternated pair by pair and each first as often, after one untimed call
    each (thread pools and caches warm for both) -> (median ms of ours, of theirs, median of theirs / ours)."""
    ours(), theirs()
    pairs = []
    for i in range(repeats + repeats % 2):
        if i % 2:
            pairs.append((ours(), theirs()))
        else:
            pairs.append(tuple(reversed((theirs(), ours()))))
    return (statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs),
            statistics.median(b / a for a, b in pairs))
