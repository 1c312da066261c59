"""How much a checkpoint's drawings follow their prompts: the flow-matching loss of fresh samples with their
prompt against the same samples with the empty prompt (the CFG branch). A model that ignores its prompts has
the two equal; the gap is what conditioning buys. Forms: the caption template through /v1/generate-image's
prompt ("caption"), and the demo's image-answer tasks (demo/task_samples.py: draw, edit, generate).

    python benchmarks/prompt_influence.py --checkpoint xfusion_serve/checkpoints/shapes-demo
"""

from __future__ import annotations

import argparse
import sys

import torch

from xfusion_serve.demo.data import ShapesDataset
from xfusion_serve.demo.task_samples import TaskSamples
from xfusion_serve.model.checkpoint import load_checkpoint
from xfusion_serve.training.trainer import CaptionSamples, TrainConfig, TrainStep


@torch.no_grad()
def mean_loss(step: TrainStep, source, batches: int, batch: int) -> float:
    return sum(step(source.batch(i, range(batch)))[1].item() / batch for i in range(batches)) / batches


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=123, help="sample seed (the recipe trains with 0)")
    args = p.parse_args()
    torch.manual_seed(0)
    ckpt = load_checkpoint(args.checkpoint)
    step = TrainStep(ckpt.model.eval())
    h, w = ckpt.config.image_sizes[0]
    print(f"{'form':<10}{'with prompt':>12}{'empty':>10}{'gap':>8}")
    for form in ("caption", "draw", "edit", "generate"):
        losses = []
        for dropout in (0.0, 1.0):
            cfg = TrainConfig(checkpoint="", out="", seed=args.seed, data_seed=args.seed + 1,
                              caption_dropout=dropout, generation_ratio=1.0)
            source = (CaptionSamples(cfg, ShapesDataset(512, args.seed + 1)) if form == "caption"
                      else TaskSamples(cfg, {form: 1.0}))
            source.prepare(ckpt, h, w, show_progress=False)
            losses.append(mean_loss(step, source, args.batches, args.batch_size))
        print(f"{form:<10}{losses[0]:>12.4f}{losses[1]:>10.4f}{losses[1] - losses[0]:>8.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
