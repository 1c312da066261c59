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
    return sum(step(source.batch(i, range(batch))).dm.item() / batch for i in range(batches)) / batches


def prompt_losses(ckpt, form: str, seed: int, batches: int, batch: int, caption_first: bool = False):
    """-> (mean flow-matching loss of fresh `form` samples with their prompts, the same with the empty prompt)."""
    step, (h, w), losses = TrainStep(ckpt.model.eval()), ckpt.config.image_sizes[0], []
    for dropout in (0.0, 1.0):
        cfg = TrainConfig(checkpoint="", out="", seed=seed, data_seed=seed + 1, caption_dropout=dropout,
                          generation_ratio=1.0)
        source = (CaptionSamples(cfg, ShapesDataset(512, seed + 1)) if form == "caption"
                  else TaskSamples(cfg, {form: 1.0}, caption_first=caption_first))
        source.prepare(ckpt, h, w, show_progress=False)
        losses.append(mean_loss(step, source, batches, batch))
    return losses[0], losses[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=123, help="sample seed (the recipe trains with 0)")
    p.add_argument("--caption-first", action="store_true",
                   help="draw and edit answers open with the target's caption (modalities [\"text\", \"image\"]; "
                        "the recipe's CAPTION_FIRST)")
    args = p.parse_args()
    torch.manual_seed(0)
    ckpt = load_checkpoint(args.checkpoint)
    print(f"{'form':<10}{'with prompt':>12}{'empty':>10}{'gap':>8}")
    for form in ("caption", "draw", "edit", "generate"):
        with_prompt, empty = prompt_losses(ckpt, form, args.seed, args.batches, args.batch_size, args.caption_first)
        print(f"{form:<10}{with_prompt:>12.4f}{empty:>10.4f}{empty - with_prompt:>8.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
