"""Where a checkpoint's image tokens look: per layer and head of the vision tower, the share of the image
queries' attention that lands on text tokens (the prompt), averaged over fresh samples with their prompts.
A tower that has learnt to ignore its prompt shows shares near zero after the first layer; with
benchmarks/prompt_influence.py (what the prompt buys in loss) it tells "cannot read the prompt" from "reads it
and gains nothing".

    python benchmarks/prompt_attention.py --checkpoint xfusion_serve/checkpoints/shapes-demo --form caption
    python benchmarks/prompt_attention.py --checkpoint build/shapes-demo-v2 --form draw

Forms: "caption" (the caption template, /v1/generate-image's prompt) or one of demo/task_samples.py's image
answers ("draw", "edit", "generate"). Under "edit" the source picture's tokens count as image, not text.
"""

from __future__ import annotations

import argparse
import sys

import torch

from xfusion_serve.demo.data import ShapesDataset
from xfusion_serve.demo.task_samples import TaskSamples
from xfusion_serve.model.checkpoint import load_checkpoint
from xfusion_serve.model.sequence import MaskedAttention, attention_mask, pad_sequences
from xfusion_serve.training.trainer import CaptionSamples, TrainConfig


class TextShare(MaskedAttention):
    """MaskedAttention that also records, per vision layer, the mean share of each head's attention from
    image queries on text keys -> self.shares[layer]: [Hq] floats in [0, 1]."""

    def __init__(self, image_ids: torch.Tensor, valid: torch.Tensor):
        super().__init__(attention_mask(image_ids, valid))
        self.image_ids, self.valid, self.shares = image_ids, valid, {}

    def __call__(self, tower: str, layer: int, q, k, v):
        if q is not None and tower == "vision":
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # GQA: each query head's key head
            logits = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
            probs = logits.masked_fill(~self.mask, float("-inf")).softmax(-1)  # [B, Hq, T, T]
            text_keys = (self.image_ids < 0) & self.valid  # [B, T]
            share = (probs * text_keys[:, None, None, :]).sum(-1).transpose(1, 2)  # [B, T, Hq]
            self.shares[layer] = share[self.image_ids >= 0].mean(0).tolist()
        return super().__call__(tower, layer, q, k, v)


def samples_of(form: str, seed: int, caption_first: bool = False):
    """A source of fresh samples of one form, with their prompts (no caption dropout)."""
    cfg = TrainConfig(checkpoint="", out="", seed=seed, data_seed=seed + 1, caption_dropout=0.0,
                      generation_ratio=1.0)
    if form == "caption":
        return CaptionSamples(cfg, ShapesDataset(512, seed + 1))
    return TaskSamples(cfg, {form: 1}, caption_first=caption_first)


@torch.no_grad()
def text_shares(ckpt, source, samples: int) -> dict[int, list[float]]:
    """-> {vision layer: [share per query head]} over the first `samples` samples of `source`."""
    source.prepare(ckpt, *ckpt.config.image_sizes[0], show_progress=False)
    model = ckpt.model.eval()
    seqs = [model.embed_sequence(s["segments"]) for s in source.batch(0, range(samples))]
    h, positions, image_ids, valid = pad_sequences(seqs)
    probe = TextShare(image_ids, valid)
    model(h, positions, image_ids, probe)
    return probe.shares


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, nargs="+")
    p.add_argument("--form", default="caption", choices=["caption", "draw", "edit", "generate"])
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seed", type=int, default=123, help="sample seed (the recipe trains with 0)")
    p.add_argument("--caption-first", action="store_true",
                   help="draw and edit answers open with the target's caption (modalities [\"text\", \"image\"])")
    args = p.parse_args()
    for path in args.checkpoint:
        source = samples_of(args.form, args.seed, args.caption_first)
        shares = text_shares(load_checkpoint(path), source, args.samples)
        print(f"{path} ({args.form}): share of image queries' attention on text, per head")
        for layer, per_head in shares.items():
            print(f"  layer {layer}: " + " ".join(f"{s:.3f}" for s in per_head))
    return 0


if __name__ == "__main__":
    sys.exit(main())
