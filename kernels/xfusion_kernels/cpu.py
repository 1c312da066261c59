"""The project's C++ kernels for the CPU, compiled on first use for this machine's processor (-march=native)
by torch.utils.cpp_extension and cached by torch (~/.cache/torch_extensions); about 40 s the first time."""

from __future__ import annotations

import functools
import hashlib
import logging
import platform
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def _cpu_tag() -> str:
    """A short name for this processor's instruction sets: a binary built for one never loads on another."""
    flags = platform.machine()
    try:
        flags += next(line for line in open("/proc/cpuinfo") if line.startswith(("flags", "Features")))
    except (OSError, StopIteration):
        pass
    return hashlib.sha256(flags.encode()).hexdigest()[:10]


@functools.cache
def cpu_linear():
    """-> the op torch.ops.xfusion.cpu_linear(x, w, b=None) (float32 x @ w^T + b, tuned for the few rows of a
    decode step; see cpu_linear.cpp), or None where it cannot be built (no C++ compiler): then use F.linear."""
    from torch.utils.cpp_extension import load

    arch = "-march=native" if platform.machine() in ("x86_64", "AMD64", "i686") else "-mcpu=native"
    try:
        load(name=f"xfusion_cpu_linear_{_cpu_tag()}", sources=[str(Path(__file__).with_name("cpu_linear.cpp"))],
             extra_cflags=["-O3", "-fopenmp", arch], extra_ldflags=["-fopenmp"], is_python_module=False)
    except Exception as e:  # noqa: BLE001 - any build failure means: no kernel here
        log.warning("the CPU linear kernel could not be built (%s: %s); using torch's", type(e).__name__, e)
        return None

    @torch.library.register_fake("xfusion::cpu_linear")
    def _(x, w, b=None):
        return x.new_empty(*x.shape[:-1], w.shape[0])

    return torch.ops.xfusion.cpu_linear
