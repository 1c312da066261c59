"""Accuracy of a shapes-world checkpoint against the sampler's guidance scale and steps (not a test: it prints
figures). Tuning seeds differ from `xfusion-serve eval`'s, so the eval stays held out.

    python benchmarks/sweep_guidance.py [--checkpoint DIR] [--guidance 1 1.5 2 3] [--steps 20] [--images 300]
    python benchmarks/sweep_guidance.py --tasks 300 [--guidance ...]   # drawing and editing conversations

The first form measures plain generation (the caption template) in this process; `--tasks N` measures N
drawing and N editing conversations each through a live server, as `xfusion-serve eval` does.
"""

from __future__ import annotations

import argparse

from xfusion_serve import EMBEDDED_CHECKPOINT, load_checkpoint
from xfusion_serve.demo.evaluate import InProcess, OverHTTP, generation_accuracy, live_server, report
from xfusion_serve.demo.evaluate_tasks import task_accuracy, task_report

TUNING_SEED = 4242


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=str(EMBEDDED_CHECKPOINT))
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0, 1.25, 1.5, 2.0, 3.0, 4.0])
    p.add_argument("--steps", type=int, nargs="+", default=[20])
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--tasks", type=int, default=0, help="drawing and editing conversations instead, N of each")
    args = p.parse_args()
    settings = [(steps, g) for steps in args.steps for g in args.guidance]
    if args.tasks:
        with live_server(args.checkpoint) as url:
            client = OverHTTP(url)
            for steps, g in settings:
                acc = task_accuracy(client, args.tasks, seed=TUNING_SEED, kinds=("draw", "edit"),
                                    sampler={"steps": steps, "guidance_scale": g})
                print(f"steps {steps:3d} guidance {g:4.2f}\n{task_report(acc)}", flush=True)
        return
    ckpt = load_checkpoint(args.checkpoint)
    for steps, g in settings:
        acc = generation_accuracy(InProcess(ckpt, steps=steps, guidance_scale=g).generate, args.images,
                                  seed=TUNING_SEED)
        print(report(f"steps {steps:3d} guidance {g:4.2f} ", acc), flush=True)


if __name__ == "__main__":
    main()
