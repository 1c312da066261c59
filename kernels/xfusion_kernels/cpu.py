"""The project's C++ kernels for the CPU (cpu_linear.cpp, cpu_attention.cpp, their vector helpers in cpu_vec.h),
compiled together on first use for this machine's processor (-march=native) by torch.utils.cpp_extension and
cached by torch (~/.cache/torch_extensions); 20-40 s the first time."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import platform
import time
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


# No build takes this long; a lock older than this is left by a build that was killed.
STALE_LOCK_S = 600


def _clear_stale_lock(name: str) -> None:
    """torch's extension builder waits, with no time limit, while a lock file from another build exists: a build
    killed half-way (Ctrl-C, a start-up timeout) would hang every later start. Removes such a lock."""
    from torch.utils.cpp_extension import _get_build_directory

    try:
        lock = Path(_get_build_directory(name, verbose=False)) / "lock"
        age = time.time() - lock.stat().st_mtime
    except (OSError, RuntimeError):  # no lock (the usual case), or no build directory
        return
    if age > STALE_LOCK_S:
        log.warning("removing %s, left %.0f s ago by a build of the CPU kernels that did not finish", lock, age)
        with contextlib.suppress(OSError):
            os.remove(lock)


@functools.cache
def _build() -> bool:
    """Builds (or loads from torch's cache) one extension with every C++ kernel; False where it cannot be built."""
    from torch.utils.cpp_extension import load

    arch = "-march=native" if platform.machine() in ("x86_64", "AMD64", "i686") else "-mcpu=native"
    sources = [str(Path(__file__).with_name(name)) for name in ("cpu_linear.cpp", "cpu_attention.cpp")]
    # torch rebuilds when a source changes, not when a header it includes does: the header's text names the build.
    header = hashlib.sha256(Path(__file__).with_name("cpu_vec.h").read_bytes()).hexdigest()[:8]
    name = f"xfusion_cpu_kernels_{_cpu_tag()}_{header}"
    _clear_stale_lock(name)
    try:
        load(name=name, sources=sources, extra_cflags=["-O3", "-fopenmp", arch],
             extra_ldflags=["-fopenmp"], is_python_module=False)
    except Exception as e:  # noqa: BLE001 - any build failure means: no kernel here
        log.warning("the CPU kernels could not be built (%s: %s); using torch's ops", type(e).__name__, e)
        return False

    @torch.library.register_fake("xfusion::cpu_linear")
    def _(x, w, b=None):
        return x.new_empty(*x.shape[:-1], w.shape[0])

    @torch.library.register_fake("xfusion::cpu_paged_decode")
    def _(q, kv_cache, block_tables, seq_lens, k, v):
        return torch.empty_like(q, memory_format=torch.contiguous_format)

    return True


def cpu_linear():
    """-> the op torch.ops.xfusion.cpu_linear(x, w, b=None) (float32 x @ w^T + b, tuned for the few rows of a
    decode step; see cpu_linear.cpp), or None where it cannot be built (no C++ compiler): then use F.linear."""
    return torch.ops.xfusion.cpu_linear if _build() else None


def cpu_paged_decode():
    """-> the op torch.ops.xfusion.cpu_paged_decode(q, kv_cache, block_tables, seq_lens, k, v): float32 decode
    attention read in place from the paged pool (see cpu_attention.cpp): q [B, Hq, d], one layer's kv_cache
    [2, blocks, block_size, Hkv, d] (contiguous), block_tables [B, M] and seq_lens [B] int32 (each counting the
    new token), the new token's k, v [B, Hkv, d] -> [B, Hq, d]. None where it cannot be built."""
    return torch.ops.xfusion.cpu_paged_decode if _build() else None
