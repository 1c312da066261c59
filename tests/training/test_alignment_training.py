"""Feature alignment inside `xfusion-serve train`: it falls on a tiny run, every process agrees on it, its MLP
trains and resumes but is never served, and with it off nothing changes."""

from __future__ import annotations

import pytest
import torch
from alignment_models import make_tiny_encoder
from conftest import make_text_tower, make_vae
from safetensors.torch import load_file
from train_runs import assert_same_weights, torchrun, train_args, train_log, weights

from xfusion_serve.cli import main as cli
from xfusion_serve.model.checkpoint import init_checkpoint


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("align")
    ckpt = init_checkpoint(make_text_tower(root / "llama"), make_vae(root / "vae"), root / "ckpt",
                           image_sizes=[(16, 16)])
    return ckpt, make_tiny_encoder(root / "dinov2", "dinov2")


def _args(ckpt, out, encoder=None, **extra) -> list[str]:
    return train_args(ckpt, out, **extra) + (["--align-encoder", str(encoder), "--align-layer", "1"] if encoder else [])


def test_the_alignment_loss_falls_in_training_and_the_servable_tower_holds_no_mlp(tmp_path, parts):
    ckpt, encoder = parts
    out = tmp_path / "aligned"
    assert cli(_args(ckpt, out, encoder, steps=40, lr=5e-3)) == 0
    align = [r["align"] for r in train_log(out)]
    assert len(align) == 40 and all(-1 <= a <= 1 for a in align)
    assert sum(align[-5:]) / 5 < sum(align[:5]) / 5 - 0.2, align  # it learns to align
    served = load_file(out / "vision_tower.safetensors")
    assert served.keys() == load_file(ckpt / "vision_tower.safetensors").keys()  # nothing of the alignment's


def test_off_by_default_it_changes_nothing(tmp_path, parts):
    ckpt, encoder = parts
    plain, zero = tmp_path / "plain", tmp_path / "zero"
    assert cli(_args(ckpt, plain)) == 0
    assert "align" not in train_log(plain)[0]
    assert cli(_args(ckpt, zero, encoder, **{"align-weight": 0.0})) == 0  # on, weighted 0: the same weights
    assert_same_weights(weights(plain), weights(zero), atol=1e-6, rtol=1e-6)


def test_two_fsdp_processes_align_as_one(tmp_path, parts):
    ckpt, encoder = parts
    one, two = tmp_path / "one", tmp_path / "two"
    assert cli(_args(ckpt, one, encoder)) == 0
    torchrun(_args(ckpt, two, encoder))
    for r1, r2 in zip(train_log(one), train_log(two), strict=True):
        assert r1["align"] == pytest.approx(r2["align"], rel=1e-4, abs=1e-6)
    assert_same_weights(weights(one), weights(two))


def test_the_mlp_resumes_with_the_run(tmp_path, parts):
    ckpt, encoder = parts
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert cli(_args(ckpt, straight, encoder)) == 0
    assert cli(_args(ckpt, resumed, encoder, steps=2)) == 0
    assert cli(_args(ckpt, resumed, encoder) + ["--resume"]) == 0
    assert [r["align"] for r in train_log(resumed)] == pytest.approx([r["align"] for r in train_log(straight)], rel=1e-5)


def test_fsdp_alignment_with_a_source_that_encodes_as_it_goes(tmp_path, parts):
    """The VAE and the encoder stay whole on every process (a source encodes with the VAE outside the forward:
    the demo's tasks here, with noised caption pictures whose clean latents the samples carry)."""
    ckpt, encoder = parts
    out = tmp_path / "tasks"
    torchrun(_args(ckpt, out, encoder, steps=2, **{"batch-size": 4, "dataset": "shapes-tasks",
                                                     "caption-max-noise": 0.5}))
    assert all(-1 <= r["align"] <= 1 and r["align"] != 0 for r in train_log(out))


def test_the_alignment_target_is_the_clean_image(parts):
    from xfusion_serve.model.sequence import ImageSegment
    from xfusion_serve.training.losses import clean_latent

    x0, noised = torch.ones(4, 2, 2), torch.zeros(4, 2, 2)
    assert clean_latent({"segments": [[1], ImageSegment(noised, 0.5)], "x0": x0}) is x0
    assert clean_latent({"segments": [[1], ImageSegment(x0, 0.0)]}) is x0
    with pytest.raises(ValueError, match="clean latent of a noised image"):
        clean_latent({"segments": [[1], ImageSegment(noised, 0.5)]})
