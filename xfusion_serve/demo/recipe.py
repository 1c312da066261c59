"""The embedded default checkpoint, from nothing, in one command on CPU:

    python -m xfusion_serve.demo.recipe --out xfusion_serve/checkpoints/shapes-demo

1. a byte-level BPE tokenizer and a small Llama pretrained on text about the shapes world (then frozen);
2. a small AutoencoderKL for 64x64 images;
3. `init` (vision blocks copied from the text blocks), then `train` (the paper's recipe) on the shapes world;
4. the figures (`evaluate`) and a manifest: the command, the seeds, sha256 of every file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import platform
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..model.checkpoint import init_checkpoint, load_checkpoint
from ..model.config import SamplerDefaults
from ..training.trainer import STATE_FILE, TrainConfig, train
from .data import ShapesDataset
from .evaluate import evaluate_in_process, report
from .text import pretrain_llm
from .vae import train_vae

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"


def sha256_files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--work", type=Path, default=None, help="scratch directory (default: OUT.work)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--llm-steps", type=int, default=1500)
    p.add_argument("--vae-steps", type=int, default=1500)
    p.add_argument("--train-steps", type=int, default=8000)
    # The paper's 0.2 starves a tiny model trained for minutes of caption signal (at 0.2 its captions
    # collapsed onto two colours); the demo weighs the caption loss 2 to 1.
    p.add_argument("--lambda-ar", type=float, default=2.0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-samples", type=int, default=300)
    p.add_argument("--sampler-steps", type=int, default=20)
    # The sampler default written into the checkpoint. Chosen with benchmarks/sweep_guidance.py on seeds the
    # eval does not use: this small model's colours drift with stronger guidance (generation colour 94% at
    # 1.5, 82% at 3.0, 62% at 6.0), while 1.0 (no guidance) loses shapes (85%).
    p.add_argument("--guidance-scale", type=float, default=1.5)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    work = args.work or args.out.with_name(args.out.name + ".work")
    if args.out.exists():
        raise SystemExit(f"{args.out} exists; remove it first")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    timings, t0 = {}, time.time()

    text_tower = pretrain_llm(work / "text_tower", steps=args.llm_steps, batch_size=32, seed=args.seed)
    timings["llm_s"] = round(time.time() - t0)
    vae = train_vae(work / "vae", steps=args.vae_steps, batch_size=32, seed=args.seed)
    timings["vae_s"] = round(time.time() - t0 - timings["llm_s"])

    init = init_checkpoint(text_tower, vae, work / "init", image_sizes=[(64, 64)], seed=args.seed,
                           sampler=SamplerDefaults(steps=args.sampler_steps, guidance_scale=args.guidance_scale))
    cfg = TrainConfig(checkpoint=str(init), out=str(work / "trained"), steps=args.train_steps,
                      batch_size=args.batch_size, lr=args.lr, warmup_steps=100, lr_schedule="cosine",
                      lambda_ar=args.lambda_ar,
                      seed=args.seed, data_seed=args.seed, save_every=1000,
                      instructions=["", "Describe the image.", "What is in this picture?", "What do you see?"])
    t1 = time.time()
    trained = train(cfg, ShapesDataset(cfg.shapes_size, cfg.data_seed))
    timings["train_s"] = round(time.time() - t1)

    (trained / STATE_FILE).unlink()  # optimizer state is for resuming, not for serving
    t2 = time.time()
    figures = evaluate_in_process(load_checkpoint(trained), args.eval_samples, args.eval_samples)
    timings["eval_s"] = round(time.time() - t2)
    for name, acc in figures.items():
        print(report(name, acc))

    shutil.copytree(trained, args.out)
    manifest = {
        "command": "python -m xfusion_serve.demo.recipe " + " ".join(sys.argv[1:] if argv is None else argv),
        "seed": args.seed,
        "train_config": asdict(cfg) | {"checkpoint": "<init>", "out": "<out>"},
        "figures": {"in_process_" + k: v for k, v in figures.items()},
        "eval_samples": args.eval_samples,
        "seconds": timings | {"total_s": round(time.time() - t0)},
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "processor": platform.machine()},
        "sha256": sha256_files(args.out),
    }
    (args.out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"wrote {args.out} in {manifest['seconds']['total_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
