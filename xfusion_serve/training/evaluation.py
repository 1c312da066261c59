"""Periodic evaluation during training: every `eval_every` steps (and after the last) a few images drawn from
fixed prompts, and what the model says of them, written to OUT/eval/ with the losses of that step.

The trainer runs an `Evaluator` on every process (under FSDP2 each forward gathers the weights, so all must
take part; their inputs are the same, so are their answers) with the whole model in hand, and the first
process writes what it returns. What draws and captions is the caller's (`xfusion-serve train` passes the
engine's uncached samplers): training code imports nothing but the model.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from ..model.xfusion import XFusionModel

EVAL_DIR = "eval"
EVAL_LOG = "log.jsonl"

# (model, step) -> {"images": [PIL images], "captions": [str], anything else JSON can hold}
Evaluator = Callable[[XFusionModel, int], dict]


@contextlib.contextmanager
def whole_model(runner: nn.Module, model: XFusionModel):
    """The model with every weight usable outside the training forward, in eval mode and without gradients:
    under FSDP2 the root's weights gathered (blocks gather their own as they run), then resharded."""
    gathered = hasattr(runner, "unshard") and hasattr(runner, "reshard")
    if gathered:
        runner.unshard()
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train()
        if gathered:
            runner.reshard()


def evaluate(runner: nn.Module, model: XFusionModel, evaluator: Evaluator, step: int, losses: dict,
             out: str | Path, rank: int, device: torch.device) -> None:
    """Runs `evaluator` at `step` (every process) and, on rank 0, writes its images as
    OUT/eval/step-SSSSSSS-I.png and one line of OUT/eval/log.jsonl: the step, `losses`, the image files and
    the rest of what the evaluator returned. If writing fails, every process raises (none is left waiting for
    the others at the next collective)."""
    with whole_model(runner, model) as m:
        result = dict(evaluator(m, step))
    failure = None
    if rank == 0:
        try:
            _write(result, step, losses, Path(out) / EVAL_DIR)
        except Exception as e:  # noqa: BLE001 - re-raised below, on every process
            failure = e
    if dist.is_initialized():
        failed = torch.tensor([failure is not None], dtype=torch.float32, device=device)
        dist.all_reduce(failed)
        if failed.item() and failure is None:
            raise RuntimeError("writing the evaluation failed on the first process; see its error")
    if failure is not None:
        raise failure


def _write(result: dict, step: int, losses: dict, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i, image in enumerate(result.pop("images", [])):
        name = f"step-{step:07d}-{i}.png"
        image.save(folder / name)
        files.append(name)
    with open(folder / EVAL_LOG, "a") as f:
        f.write(json.dumps({"step": step} | losses | {"images": files} | result) + "\n")


def due(step: int, every: int, last: bool) -> bool:
    """Whether the evaluation runs after `step` (0-based): every `every` steps and after the last; never
    when every is 0."""
    return every > 0 and ((step + 1) % every == 0 or last)
