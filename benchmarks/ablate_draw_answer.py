"""Where a drawing starts: straight after the user's words, or after the assistant has said, in the world's caption
words, what it draws (the recipe's CAPTION_FIRST; the server's modalities ["text", "image"]). The vision tower
is trained twice on drawing alone from one untrained checkpoint, everything equal (seed, steps, tasks, lr) but
that, and each is measured on fresh drawings: the flow-matching loss with the prompt and with the empty one
(what the prompt buys: benchmarks/prompt_influence.py) and the share of the image queries' attention on text
per vision layer (benchmarks/prompt_attention.py).

    python -m xfusion_serve.demo.recipe --out /tmp/demo --work /tmp/demo.work   # or any recipe's work dir
    python benchmarks/ablate_draw_answer.py --init /tmp/demo.work/init --out /tmp/ablate-draw --steps 500
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from prompt_attention import samples_of, text_shares
from prompt_influence import prompt_losses

from xfusion_serve.demo.recipe import LAMBDA_AR, LR, vision_config
from xfusion_serve.demo.task_samples import TaskSamples
from xfusion_serve.model.checkpoint import load_checkpoint
from xfusion_serve.training.trainer import train


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init", required=True, type=Path, help="an untrained checkpoint (a recipe's WORK/init)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=LR)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-seed", type=int, default=123)
    args = p.parse_args()

    rows = []
    for name, caption_first in (("after the user's words", False), ("after its caption", True)):
        cfg = vision_config(args.init, args.out / ("caption-first" if caption_first else "direct"),
                            steps=args.steps, batch_size=args.batch_size, lr=args.lr, lambda_ar=LAMBDA_AR,
                            seed=args.seed)
        t0 = time.time()
        ckpt = load_checkpoint(train(cfg, samples=TaskSamples(cfg, {"draw": 1}, caption_first=caption_first)))
        with_prompt, empty = prompt_losses(ckpt, "draw", args.eval_seed, 4, 32, caption_first)
        shares = text_shares(ckpt, samples_of("draw", args.eval_seed, caption_first), 16)
        rows.append((name, with_prompt, empty, [sum(s) / len(s) for s in shares.values()]))
        print(f"{name}: {args.steps} steps in {time.time() - t0:.0f} s", flush=True)

    layers = len(rows[0][3])
    print(f"\ndrawing only, {args.steps} steps of {args.batch_size}, lr {args.lr:g}, seed {args.seed}; fresh drawings "
          f"(seed {args.eval_seed})")
    print(f"{'the image starts':<24}{'loss, prompt':>14}{'empty':>8}{'gap':>8}  "
          + " ".join(f"{'text share L' + str(i):>15}" for i in range(layers)))
    for name, with_prompt, empty, shares in rows:
        print(f"{name:<24}{with_prompt:>14.4f}{empty:>8.4f}{empty - with_prompt:>8.4f}  "
              + " ".join(f"{s:>15.3f}" for s in shares))
    return 0


if __name__ == "__main__":
    sys.exit(main())
