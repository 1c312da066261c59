"""Helpers for tests that run `xfusion-serve train`: options, torchrun, and what a run wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from xfusion_serve.training.trainer import LOG_FILE

TINY_RUN = {"steps": 4, "batch-size": 8, "shapes-size": 32, "lr": 1e-3, "warmup-steps": 1, "log-every": 1}


def train_args(ckpt: Path, out: Path, **extra) -> list[str]:
    """`train` options for a tiny run on the shapes world; extra: option -> value (True: a bare flag)."""
    opts = TINY_RUN | extra
    return ["train", "--checkpoint", str(ckpt), "--out", str(out), "--no-progress"] + [
        x for k, v in opts.items() for x in ([f"--{k}"] if v is True else [f"--{k}", str(v)])]


def torchrun(args: list[str], processes: int = 2) -> None:
    """`xfusion-serve` with these arguments under torchrun (gloo, one thread a process); asserts it succeeded."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
           "-m", "xfusion_serve.cli"] + args
    proc = subprocess.run(cmd, env=os.environ | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "vision_tower.safetensors")


def train_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / LOG_FILE).read_text().splitlines()]


def assert_same_weights(a: dict, b: dict, atol: float = 1e-4, rtol: float = 1e-4) -> None:
    """The same weights to a tenth of one step of TINY_RUN's learning rate. AdamW moves a weight by about
    lr * g / (|g| + 1e-8), so a gradient near its eps, where one process and two (FSDP's all-reduce) round
    differently, moves by a different fraction of lr: on one machine (AMD EPYC, torch 2.13) one element of 8192
    in test_alignment_training differed by 6e-5, where a wrong learning rate or unsynchronised gradients move
    whole tensors by about lr."""
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=rtol, msg=lambda m, k=k: f"{k}: {m}")
