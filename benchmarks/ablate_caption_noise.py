"""Clean or noisy pictures for captioning: one of X-Fusion's findings (section 6, "noise in image-to-text
data"), at toy scale. The vision tower is trained twice from one untrained checkpoint, everything equal
(seed, steps, data, mix) but the noise on the pictures of text answers: clean (t = 0, the paper's advice, the
recipe's default) or t ~ U(0, --max-noise). Both are measured with the recipe's eval (the conversation tasks
through a live server, the plain routes in process) and printed side by side.

    python -m xfusion_serve.demo.recipe --out /tmp/demo --work /tmp/demo.work   # or any recipe's work dir
    python benchmarks/ablate_caption_noise.py --init /tmp/demo.work/init --steps 2000 --out /tmp/ablation
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from xfusion_serve.demo.recipe import LAMBDA_AR, LR, measure, print_figures, task_samples, vision_config
from xfusion_serve.training.trainer import train


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init", required=True, type=Path, help="an untrained checkpoint (a recipe's WORK/init)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--max-noise", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=LR)
    p.add_argument("--lambda-ar", type=float, default=LAMBDA_AR)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-samples", type=int, default=200)
    p.add_argument("--eval-tasks", type=int, default=100)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)

    results = {}
    for name, noise in (("clean", 0.0), (f"noisy (t ~ U(0, {args.max_noise:g}))", args.max_noise)):
        cfg = vision_config(args.init, args.out / f"noise-{noise:g}", steps=args.steps, batch_size=args.batch_size,
                            lr=args.lr, lambda_ar=args.lambda_ar, caption_max_noise=noise, seed=args.seed)
        t0 = time.time()
        trained = train(cfg, samples=task_samples(cfg))
        print(f"\n{name}: {args.steps} steps in {time.time() - t0:.0f} s")
        results[name] = measure(trained, args.eval_samples, args.eval_tasks)
    (args.out / "ablation.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                        "figures": results}, indent=2) + "\n")
    print("\ncaptioning-picture noise ablation, same seed and steps:")
    for name, figures in results.items():
        print(f"\n{name}")
        print_figures(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
