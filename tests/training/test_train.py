"""`xfusion-serve train` on a tiny config: losses fall, the text tower is untouched, DDP == one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import file_bytes
from safetensors.torch import load_file

from xfusion_serve import load_checkpoint
from xfusion_serve.cli import main as cli
from xfusion_serve.demo.data import ShapesDataset
from xfusion_serve.engine.uncached import caption_greedy_uncached, sample_images_uncached
from xfusion_serve.training.datasets import encode_dataset
from xfusion_serve.training.trainer import LOG_FILE, TrainConfig, TrainStep, make_sample


def _args(ckpt, out, **extra):
    opts = {"steps": 4, "batch-size": 8, "shapes-size": 32, "lr": 1e-3, "warmup-steps": 1, "log-every": 1} | extra
    return ["train", "--checkpoint", str(ckpt), "--out", str(out), "--no-progress"] + [
        x for k, v in opts.items() for x in (f"--{k}", str(v))]


def _log(out):
    return [json.loads(line) for line in (out / LOG_FILE).read_text().splitlines()]


def test_training_lowers_both_losses_and_keeps_the_text_tower(tmp_path, checkpoint_dir):
    before = file_bytes(checkpoint_dir / "text_tower")
    out = tmp_path / "trained"
    assert cli(_args(checkpoint_dir, out, steps=120, lr=5e-3, **{"batch-size": 16})) == 0
    assert len(_log(out)) == 120
    # Both losses on one fixed held-out batch, before and after.
    untrained, trained_ckpt = load_checkpoint(checkpoint_dir), load_checkpoint(out)
    cfg = TrainConfig(checkpoint="", out="")
    data = ShapesDataset(16, seed=99)
    latents = encode_dataset(untrained.vae, data, 16, 16, show_progress=False)
    batch = [make_sample(cfg, 10**6, j, latents, data.captions(), untrained.tokenizer) for j in range(48)]
    with torch.no_grad():
        losses = [TrainStep(c.model)(batch) for c in (untrained, trained_ckpt)]
    # 120 steps bring them to about 0.30x (text) and 0.43x (flow matching) of the start: a clear margin.
    (ar0, fm0, _), (ar1, fm1, _) = losses
    assert ar1 < 0.5 * ar0 and fm1 < 0.6 * fm0, losses
    assert file_bytes(checkpoint_dir / "text_tower") == before
    assert file_bytes(out / "text_tower") == before

    ckpt = load_checkpoint(out)  # the result is a servable checkpoint
    trained, untrained = load_file(out / "vision_tower.safetensors"), load_file(checkpoint_dir / "vision_tower.safetensors")
    assert not torch.equal(trained["proj_out.weight"], untrained["proj_out.weight"])
    latents = sample_images_uncached(ckpt.model, ckpt.tokenizer, ["a red circle"], [0], 2, 2.0, 1.0, 16, 16)
    assert latents.shape == (1, 4, 8, 8) and torch.isfinite(latents).all()
    ids = caption_greedy_uncached(ckpt.model, ckpt.tokenizer, latents, "", 5, set(ckpt.eos_token_ids))
    assert len(ids) == 1 and len(ids[0]) <= 5


def test_resume_continues_exactly(tmp_path, checkpoint_dir):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert cli(_args(checkpoint_dir, straight, steps=4)) == 0
    assert cli(_args(checkpoint_dir, resumed, steps=2)) == 0
    assert cli(_args(checkpoint_dir, resumed, steps=4) + ["--resume"]) == 0
    a, b = load_file(straight / "vision_tower.safetensors"), load_file(resumed / "vision_tower.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-6)
    assert [r["step"] for r in _log(resumed)] == [0, 1, 2, 3]


def test_two_processes_equal_one(tmp_path, checkpoint_dir):
    one, two = tmp_path / "one", tmp_path / "two"
    assert cli(_args(checkpoint_dir, one)) == 0
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "xfusion_serve.cli"] + _args(checkpoint_dir, two)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = load_file(one / "vision_tower.safetensors"), load_file(two / "vision_tower.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    for r1, r2 in zip(_log(one), _log(two)):
        assert r1["ar"] == pytest.approx(r2["ar"], rel=1e-4) and r1["dm"] == pytest.approx(r2["dm"], rel=1e-4)


def test_samples_follow_the_recipe(checkpoint_dir):
    ckpt = load_checkpoint(checkpoint_dir, load_vae=False)
    cfg = TrainConfig(checkpoint="", out="", caption_dropout=0.5)
    latents = torch.randn(10, 4, 8, 8)
    captions = ["a small red circle at the top left"] * 10
    samples = [make_sample(cfg, 0, j, latents, captions, ckpt.tokenizer) for j in range(600)]
    gen = [s for s in samples if "velocity" in s]
    cap = [s for s in samples if "targets" in s]
    assert len(gen) / len(samples) == pytest.approx(2 / 3, abs=0.06)  # generation : captioning = 2 : 1
    assert all(s["segments"][1].t == 0.0 for s in cap)  # captioning images are clean: a dataset latent exactly
    assert all(any(torch.equal(s["segments"][1].latent, x) for x in latents) for s in cap)
    assert all(s["targets"][-1] == ckpt.tokenizer.eos_token_id for s in cap)
    ts = torch.tensor([s["segments"][1].t for s in gen])
    assert 0.4 < ts.median() < 0.6 and ts.std() < 0.25  # logit-normal, not uniform (std 0.29)
    dropped = sum(s["segments"][0] == [ckpt.tokenizer.bos_token_id] for s in gen) / len(gen)
    assert dropped == pytest.approx(0.5, abs=0.08)
    noisy = [make_sample(TrainConfig(checkpoint="", out="", caption_max_noise=0.3), 0, j, latents, captions,
                         ckpt.tokenizer) for j in range(300)]
    noisy = [s for s in noisy if "targets" in s]
    assert noisy and all(0.0 < s["segments"][1].t <= 0.3 for s in noisy)  # unless asked for
    assert not any(any(torch.equal(s["segments"][1].latent, x) for x in latents) for s in noisy)
    # The same (seed, step, index) gives the same sample, whichever process draws it.
    again = make_sample(cfg, 0, 7, latents, captions, ckpt.tokenizer)
    assert torch.equal(again["segments"][1].latent, samples[7]["segments"][1].latent)


def test_bad_train_config_is_refused():
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(checkpoint="a", out="b", lr_schedule="linear")
