"""Peak memory per process of `xfusion-serve train` under FSDP2 and DDP, side by side in one run.

    python benchmarks/train_memory.py --preset smol-135m                      # builds the model (cached)
    python benchmarks/train_memory.py --preset llama-3.2-1b --shardings fsdp  # where DDP cannot fit
    python benchmarks/train_memory.py --checkpoint DIR --processes 2 --steps 3

Each configuration is a real run under torchrun (gloo on the CPU, NCCL on GPUs) on the shapes world; the
figure is the trainer's own `peak_memory_gib` (the largest process's peak RSS on the CPU, CUDA memory
allocated on a GPU) of the last logged step, before the final save. On the CPU the runs set glibc's
MALLOC_MMAP_THRESHOLD_=65536, so that a freed large buffer (FSDP's gathered blocks, reduced gradients) leaves
the RSS, as a GPU's allocator statistics count it; --glibc-default measures without it. Beside it, what the weights, gradients and
AdamW state alone take per process by design: DDP keeps all of them on every process, FSDP2 1/processes of
each (its gathered blocks and activations come on top), which says where a run that does not fit would land.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def by_design(text_cfg, cfg, vae, processes: int) -> dict[str, float]:
    """Bytes per process of fp32 weights (both towers), gradients and AdamW's two moments (vision tower), from
    the model's own classes on the meta device."""
    import torch

    from xfusion_serve.model.llama import TextTower
    from xfusion_serve.model.xfusion import VisionTower

    with torch.device("meta"):
        text = sum(p.numel() for p in TextTower(text_cfg).parameters())
        vision = sum(p.numel() for p in VisionTower(text_cfg, cfg, vae).parameters())
    total = 4 * (text + vision) + 4 * vision + 8 * vision
    return {"ddp": total, "fsdp": total / processes, "text_params": text, "vision_params": vision}


def shapes_of(checkpoint: Path):
    """(text tower LlamaConfig, XFusionConfig, VAEInfo) of a checkpoint directory."""
    from xfusion_serve.model.checkpoint import load_text_config
    from xfusion_serve.model.config import VAEInfo, XFusionConfig, resolve_component

    cfg = XFusionConfig.load(checkpoint)
    return (load_text_config(resolve_component(checkpoint, cfg.text_tower, "text tower")), cfg,
            VAEInfo.from_dir(resolve_component(checkpoint, cfg.vae, "VAE")))


def shapes_of_preset(preset: str, vae: str, image_size: tuple[int, int]):
    """The same for a make_checkpoint.py preset, with nothing built: its published configs."""
    from make_checkpoint import PRESETS, VAES
    from transformers import LlamaConfig

    from xfusion_serve.model.config import VAEInfo, XFusionConfig

    p = PRESETS[preset]
    rope = {"rope_theta": p.rope_theta} | (p.rope_scaling or {"rope_type": "default"})
    text_cfg = LlamaConfig(vocab_size=p.vocab, hidden_size=p.hidden, intermediate_size=p.intermediate,
                           num_hidden_layers=p.layers, num_attention_heads=p.heads, num_key_value_heads=p.kv_heads,
                           head_dim=p.head_dim or p.hidden // p.heads, max_position_embeddings=p.max_positions,
                           rope_parameters=rope, tie_word_embeddings=True)
    v = VAES[vae]
    info = VAEInfo(v["latent_channels"], 2 ** (len(v["block_out_channels"]) - 1), v["scaling_factor"],
                   v["shift_factor"] or 0.0)
    return text_cfg, XFusionConfig(image_sizes=[image_size]), info


def run(checkpoint: Path, sharding: str, args) -> dict:
    # The run writes its checkpoints (GBs at the 1B shape) into a folder removed when it returns.
    with tempfile.TemporaryDirectory(prefix=f"train-memory-{sharding}-") as tmp:
        return _train_and_read_log(checkpoint, sharding, args, Path(tmp) / "run")


def _train_and_read_log(checkpoint: Path, sharding: str, args, out: Path) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.processes),
           "-m", "xfusion_serve.cli", "train", "--checkpoint", str(checkpoint), "--out", str(out),
           "--dataset", "shapes", "--shapes-size", str(args.batch_size * 2), "--steps", str(args.steps),
           "--batch-size", str(args.batch_size), "--grad-accum", str(args.grad_accum), "--sharding", sharding,
           "--log-every", "1", "--warmup-steps", "1", "--no-progress", "--precision", args.precision,
           "--device", args.device] + (["--activation-checkpointing"] if args.activation_checkpointing else [])
    env = os.environ | {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // args.processes))}
    if not args.glibc_default:  # large blocks mmap'd: memory freed leaves the RSS, as a GPU allocator counts it
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["exit %d" % proc.returncode])[-1][:160]}
    rows = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    return rows[-1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", type=Path)
    src.add_argument("--preset", help="build one with benchmarks/make_checkpoint.py (cached), e.g. llama-3.2-1b")
    p.add_argument("--vae", default="sd", help="with --preset")
    p.add_argument("--image-size", default="256x256", help="with --preset: WIDTHxHEIGHT")
    p.add_argument("--shardings", default="fsdp,ddp")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4, help="global")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--precision", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--design-only", action="store_true", help="with --preset: print what each sharding holds by "
                   "design, building and running nothing")
    p.add_argument("--glibc-default", action="store_true", help="on the CPU, measure RSS with glibc's default "
                   "allocator settings (freed heap memory stays resident, and is counted)")
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "xfusion-serve" / "train-memory")
    args = p.parse_args(argv)

    w, h = map(int, args.image_size.split("x"))
    if args.design_only:
        if not args.preset:
            p.error("--design-only takes a --preset")
        design = by_design(*shapes_of_preset(args.preset, args.vae, (h, w)), args.processes)
    else:
        checkpoint = args.checkpoint
        if checkpoint is None:
            import make_checkpoint

            checkpoint = args.cache / f"{args.preset}-{args.vae}-{args.image_size}"
            if not (checkpoint / "xfusion_config.json").exists():
                make_checkpoint.build(args.preset, args.vae, (h, w), checkpoint)
        design = by_design(*shapes_of(checkpoint), args.processes)
    print(f"model {args.checkpoint or args.preset}: text tower {design['text_params'] / 1e6:.1f}M parameters "
          f"(frozen), vision tower {design['vision_params'] / 1e6:.1f}M (trained); {args.processes} processes, "
          f"global batch {args.batch_size}, {args.grad_accum} micro-batch(es), {args.steps} steps, precision "
          f"{args.precision}, activation checkpointing {'on' if args.activation_checkpointing else 'off'}", flush=True)
    if args.design_only:
        for sharding in args.shardings.split(","):
            print(f"{sharding:<10} weights + gradients + AdamW per process by design: "
                  f"{design[sharding] / 2**30:.2f} GiB")
        return 0
    print(f"{'sharding':<10}{'peak GiB / process':>20}{'by design GiB':>16}{'tok/s':>10}")
    for sharding in args.shardings.split(","):
        row = run(checkpoint, sharding, args)
        design_gib = design[sharding] / 2**30
        if "error" in row:
            print(f"{sharding:<10}{'failed':>20}{design_gib:>16.2f}{'':>10}  {row['error']}")
        else:
            print(f"{sharding:<10}{row['peak_memory_gib']:>20.2f}{design_gib:>16.2f}{row['tok_s']:>10.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
