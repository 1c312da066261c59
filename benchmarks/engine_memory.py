"""Where a served model's memory goes on the CPU: resident memory (RSS) after each stage of starting an engine,
beside what the weights and KV pools hold by design.

    python benchmarks/engine_memory.py --checkpoint DIR --dtype bfloat16

Each row is a fresh process (one with the decode step compiled, one without), so that a stage's RSS is not
left over from another's. Stages: the imports (Python, torch, transformers, diffusers), the checkpoint loaded
(safetensors are memory-mapped: weights become resident as they are first touched), the engine made (KV pools
allocated, projections fused, and with --compile-decode the compiled decode step built and run once).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys


def rss_gib() -> float:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def stages(checkpoint: str, dtype: str, compile_decode: bool) -> dict:
    """Runs in the child process: the RSS after each stage, and the bytes by design."""
    out = {}
    from xfusion_serve import Engine, EngineConfig, load_checkpoint

    out["imports"] = rss_gib()
    ckpt = load_checkpoint(checkpoint, dtype=dtype)
    out["checkpoint"] = rss_gib()
    engine = Engine(ckpt, EngineConfig(dtype=dtype, compile_decode=compile_decode))
    out["engine"] = rss_gib()
    modules = [ckpt.model] + ([ckpt.vae] if ckpt.vae is not None else [])
    out["weights"] = sum(p.numel() * p.element_size() for m in modules for p in m.parameters()) / 2**30
    out["kv_pools"] = sum(pool.nbytes for pool in engine.runner.pools.values()) / 2**30
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--child", choices=["compiled", "eager"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(stages(args.checkpoint, args.dtype, args.child == "compiled")))
        return 0

    print(f"{args.checkpoint}, {args.dtype}: RSS in GiB after each stage (each row a fresh process)")
    print(f"{'decode step':<12}{'imports':>9}{'checkpoint':>12}{'engine':>9}{'weights':>9}{'KV pools':>10}"
          f"{'engine - (imports + weights + KV)':>36}")
    for mode in ("eager", "compiled"):
        proc = subprocess.run([sys.executable, __file__, "--checkpoint", args.checkpoint, "--dtype", args.dtype,
                               "--child", mode], capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{mode:<12}failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        rest = r["engine"] - (r["imports"] + r["weights"] + r["kv_pools"])
        print(f"{mode:<12}{r['imports']:>9.2f}{r['checkpoint']:>12.2f}{r['engine']:>9.2f}{r['weights']:>9.2f}"
              f"{r['kv_pools']:>10.2f}{rest:>36.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
