"""Training at scale on the CPU (gloo): FSDP2 and DDP reach the weights of one process, a resumed distributed
run those of a straight one, micro-batches those of one batch, activation checkpointing those without it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import make_text_tower, make_vae
from PIL import Image
from train_runs import assert_same_weights, torchrun, train_args, train_log, weights

from xfusion_serve.cli import main as cli
from xfusion_serve.model.checkpoint import init_checkpoint, load_checkpoint
from xfusion_serve.training.parallel import checkpoint_blocks
from xfusion_serve.training.saving import STATE_POINTER
from xfusion_serve.training.trainer import TrainConfig, TrainStep, make_sample, train


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    """The tiny random checkpoint (conftest's), made once for this module's runs."""
    root = tmp_path_factory.mktemp("ckpt")
    return init_checkpoint(make_text_tower(root / "llama"), make_vae(root / "vae"), root / "ckpt",
                           image_sizes=[(16, 16), (8, 16)])


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, checkpoint_dir):
    """The reference: 4 steps of a global batch of 8 in one process, one micro-batch."""
    out = tmp_path_factory.mktemp("one") / "out"
    assert cli(train_args(checkpoint_dir, out)) == 0
    return out


@pytest.mark.parametrize("sharding", ["fsdp", "ddp"])
def test_two_processes_reach_the_weights_of_one(tmp_path, checkpoint_dir, one_process, sharding):
    two = tmp_path / "two"
    torchrun(train_args(checkpoint_dir, two, sharding=sharding))
    assert_same_weights(weights(one_process), weights(two))
    for r1, r2 in zip(train_log(one_process), train_log(two), strict=True):
        assert r1["ar"] == pytest.approx(r2["ar"], rel=1e-4) and r1["dm"] == pytest.approx(r2["dm"], rel=1e-4)
        assert r1["tokens"] == r2["tokens"]  # every process's tokens counted once


def test_a_resumed_fsdp_run_equals_a_straight_one(tmp_path, checkpoint_dir, one_process):
    resumed = tmp_path / "resumed"
    torchrun(train_args(checkpoint_dir, resumed, steps=2))
    first = json.loads((resumed / STATE_POINTER).read_text())
    assert first["step"] == 2 and (resumed / first["dir"]).is_dir()
    torchrun(train_args(checkpoint_dir, resumed, steps=4) + ["--resume"])
    assert_same_weights(weights(one_process), weights(resumed))
    assert [r["step"] for r in train_log(resumed)] == [0, 1, 2, 3]
    assert [r["tokens"] for r in train_log(resumed)] == [r["tokens"] for r in train_log(one_process)]
    state = json.loads((resumed / STATE_POINTER).read_text())
    assert state["step"] == 4 and not (resumed / first["dir"]).exists()  # the older state is gone


@pytest.mark.parametrize("accum", [2, 4])
def test_micro_batches_equal_one_batch(tmp_path, checkpoint_dir, one_process, accum):
    out = tmp_path / f"accum{accum}"
    assert cli(train_args(checkpoint_dir, out, **{"grad-accum": accum})) == 0
    assert_same_weights(weights(one_process), weights(out))


def test_fsdp_with_micro_batches_and_activation_checkpointing(tmp_path, checkpoint_dir, one_process):
    out = tmp_path / "all"
    torchrun(train_args(checkpoint_dir, out, **{"grad-accum": 2, "activation-checkpointing": True}))
    assert_same_weights(weights(one_process), weights(out))


def test_activation_checkpointing_changes_no_gradient(tmp_path, checkpoint_dir, one_process):
    out = tmp_path / "ac"
    assert cli(train_args(checkpoint_dir, out, **{"activation-checkpointing": True})) == 0
    assert_same_weights(weights(one_process), weights(out), atol=1e-6, rtol=1e-6)


def test_a_token_budget_stops_the_run_and_the_log_counts_tokens(tmp_path, checkpoint_dir, one_process):
    tokens = [r["tokens"] for r in train_log(one_process)]
    assert 0 < tokens[0] < tokens[1] < tokens[2] < tokens[3]  # running totals
    out = tmp_path / "budget"
    assert cli(train_args(checkpoint_dir, out, steps=50, **{"max-tokens": train_log(one_process)[1]["tokens"]})) == 0
    rows = train_log(out)
    assert [r["step"] for r in rows] == [0, 1]  # stopped once the budget was reached, after the second step
    assert json.loads((out / STATE_POINTER).read_text())["step"] == 2 and (out / "vision_tower.safetensors").is_file()
    assert all(r["tok_s"] > 0 for r in rows)


@pytest.mark.parametrize("bad, match", [({"grad_accum": 0}, "grad_accum"), ({"sharding": "zero2"}, "sharding"),
                                        ({"max_tokens": 0}, "max_tokens")])
def test_bad_scale_options_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(checkpoint="", out="", **bad)


def test_a_batch_that_does_not_split_is_refused_before_anything_is_written(tmp_path, checkpoint_dir, capsys):
    assert cli(train_args(checkpoint_dir, tmp_path / "x", **{"grad-accum": 3})) != 0
    assert "batch_size 8 must be a multiple of processes x grad_accum (1 x 3)" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("checkpointed", [False, True])
def test_activation_checkpointing_recomputes_every_block_in_the_backward(checkpoint_dir, checkpointed):
    """What makes it save memory: each block's forward runs again in the backward pass (and only then)."""
    model = load_checkpoint(checkpoint_dir).model.train()
    tokenizer = load_checkpoint(checkpoint_dir, load_vae=False).tokenizer
    blocks = [*model.text.model.layers, *model.vision.layers]
    calls = [0] * len(blocks)
    for i, block in enumerate(blocks):
        block.serve_rows = lambda *a, _i=i, _f=block.serve_rows: calls.__setitem__(_i, calls[_i] + 1) or _f(*a)
    if checkpointed:
        checkpoint_blocks(model)
    cfg = TrainConfig(checkpoint="", out="", generation_ratio=0.5)
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    batch = [make_sample(cfg, 0, j, latents, ["a red circle"] * 4, tokenizer) for j in range(4)]
    ar, dm, _ = TrainStep(model)(batch)
    assert calls == [1] * len(blocks)
    (ar + dm).backward()
    assert calls == [2 if checkpointed else 1] * len(blocks)


def _eval_rows(out):
    return [json.loads(line) for line in (out / "eval" / "log.jsonl").read_text().splitlines()]


def test_periodic_evaluation_writes_drawings_captions_and_losses(tmp_path, checkpoint_dir):
    out = tmp_path / "evaluated"
    prompts = ["a red circle", "a blue square"]
    assert cli(train_args(checkpoint_dir, out, **{"eval-every": 2}) + ["--eval-prompts", *prompts]) == 0
    rows, log = _eval_rows(out), train_log(out)
    assert [r["step"] for r in rows] == [2, 4]  # after every 2 steps; the last is step 4
    for r in rows:
        assert r["prompts"] == prompts and len(r["captions"]) == 2 and all(isinstance(c, str) for c in r["captions"])
        assert (r["ar"], r["dm"]) == (log[r["step"] - 1]["ar"], log[r["step"] - 1]["dm"])  # that step's losses
        for name in r["images"]:
            with Image.open(out / "eval" / name) as im:
                assert im.size == (16, 16)  # the checkpoint's first trained size
    assert len(rows[0]["images"]) == 2
    first, last = (np.asarray(Image.open(out / "eval" / rows[i]["images"][0]), dtype=np.int16) for i in (0, 1))
    assert np.abs(first - last).max() > 0  # drawn by the model as it trains, not a fixed picture


def test_fsdp_processes_evaluate_together(tmp_path, checkpoint_dir):
    """Every process takes part in each evaluation's forwards (FSDP gathers weights): no hang, one writer."""
    one, two = tmp_path / "one", tmp_path / "two"
    extra = train_args(checkpoint_dir, one, **{"eval-every": 4}) + ["--eval-prompts", "a red circle"]
    assert cli(extra) == 0
    torchrun(train_args(checkpoint_dir, two, **{"eval-every": 4}) + ["--eval-prompts", "a red circle"])
    (a,), (b,) = _eval_rows(one), _eval_rows(two)
    assert a["captions"] == b["captions"] and len(b["images"]) == 1


def test_evaluation_without_prompts_or_an_evaluator_is_refused(tmp_path, checkpoint_dir, capsys):
    assert cli(train_args(checkpoint_dir, tmp_path / "x", **{"eval-every": 2})) != 0
    assert "--eval-every needs --eval-prompts" in capsys.readouterr().err
    with pytest.raises(ValueError, match="eval_every needs an evaluator"):
        train(TrainConfig(checkpoint=str(checkpoint_dir), out=str(tmp_path / "y"), eval_every=2), data=[])
    with pytest.raises(ValueError, match="eval_every"):
        TrainConfig(checkpoint="", out="", eval_every=-1)


def test_resume_refuses_a_run_it_would_not_continue(tmp_path, checkpoint_dir, one_process, capsys):
    import shutil

    out = tmp_path / "other"
    shutil.copytree(one_process, out)
    for option, value in [("batch-size", 4), ("seed", 7), ("shapes-size", 16)]:
        assert cli(train_args(checkpoint_dir, out, steps=6, **{option: value}) + ["--resume"]) != 0
        assert f"{option.replace('-', '_')}: saved" in capsys.readouterr().err
    old = tmp_path / "old"
    old.mkdir()
    (old / "trainer_state.pt").write_bytes(b"")
    assert cli(train_args(checkpoint_dir, old) + ["--resume"]) != 0
    assert "older xfusion-serve's state" in capsys.readouterr().err


FAILING_SOURCE = """
import os, sys
from xfusion_serve.demo.data import ShapesDataset
from xfusion_serve.training.trainer import CaptionSamples, TrainConfig, train

class FailsOnRankOne(CaptionSamples):
    def batch(self, step, indices):
        if step == 1 and os.environ["RANK"] == "1":
            raise OSError("rank one's data went away")
        return super().batch(step, indices)

cfg = TrainConfig(checkpoint=sys.argv[1], out=sys.argv[2], steps=3, batch_size=4, progress=False)
train(cfg, samples=FailsOnRankOne(cfg, ShapesDataset(8, seed=0)))
"""


def test_a_data_error_on_one_process_stops_every_process(tmp_path, checkpoint_dir):
    script = tmp_path / "run.py"
    script.write_text(FAILING_SOURCE)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(checkpoint_dir), str(tmp_path / "out")]
    proc = subprocess.run(cmd, env=os.environ | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=120)  # a process left waiting for the other would hang until the timeout
    assert proc.returncode != 0
    assert "rank one's data went away" in proc.stderr
    assert "another process could not read its data at step 1" in proc.stderr
