"""Checkpoint layout, `init`, and the errors a bad checkpoint gives at load."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import file_bytes, make_text_tower, set_config
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from xfusion_serve import CheckpointError, ImageSegment, init_checkpoint, load_checkpoint
from xfusion_serve.cli import main as cli
from xfusion_serve.model.sequence import padded_forward


def test_init_writes_the_documented_layout(checkpoint_dir, text_tower):
    names = {p.name for p in checkpoint_dir.iterdir()}
    assert names == {"xfusion_config.json", "text_tower", "vision_tower.safetensors", "vae"}
    assert file_bytes(checkpoint_dir / "text_tower") == file_bytes(text_tower)
    # The copied text tower is still a plain transformers directory.
    AutoModelForCausalLM.from_pretrained(checkpoint_dir / "text_tower")
    AutoTokenizer.from_pretrained(checkpoint_dir / "text_tower")
    keys = set(load_file(checkpoint_dir / "vision_tower.safetensors"))
    assert {"patch_embed.weight", "proj_out.weight", "pos_embed", "boi", "eoi", "norm.weight",
            "time_embed.0.weight", "layers.1.mlp.down_proj.weight"} <= keys
    assert not any(k.startswith("model.") or k.startswith("lm_head") for k in keys)


def test_init_copies_text_blocks_into_vision_blocks(checkpoint_dir):
    model = load_checkpoint(checkpoint_dir, load_vae=False).model
    for text_block, vision_block in zip(model.text.model.layers, model.vision.layers):
        for (name, a), (_, b) in zip(text_block.state_dict().items(), vision_block.state_dict().items()):
            assert torch.equal(a, b), name
    assert torch.count_nonzero(model.vision.proj_out.weight) == 0


@pytest.mark.parametrize("link", [False, True])
def test_init_load_and_backward_never_touch_the_text_tower(tmp_path, text_tower, vae_dir, link):
    before = file_bytes(text_tower)
    ckpt_dir = init_checkpoint(text_tower, vae_dir, tmp_path / "c", image_sizes=[(16, 16)], xfuse=True,
                               link_text_tower=link)
    assert (ckpt_dir / "text_tower").exists() != link
    ckpt = load_checkpoint(ckpt_dir)
    model = ckpt.model
    assert all(not p.requires_grad for p in model.text.parameters())
    assert all(p.requires_grad for p in model.vision.parameters())
    # A training-like step: a loss through both heads reaches only the vision tower.
    seq = model.embed_sequence([[2, 7], ImageSegment(torch.randn(4, 8, 8), t=0.5), [9]])
    h = padded_forward(model, seq.embeds[None], seq.positions[None], seq.image_ids[None])[0]
    (model.text.logits(h).sum() + model.velocity(h[seq.image_slices[0]][None], 8, 8).sum()).backward()
    assert all(p.grad is None for p in model.text.parameters())
    assert model.vision.patch_embed.weight.grad is not None
    assert file_bytes(text_tower) == before
    assert link or file_bytes(ckpt_dir / "text_tower") == before
    assert ckpt.text_tower_dir == (text_tower if link else ckpt_dir / "text_tower")


def test_cli_init_then_load(tmp_path, text_tower, vae_dir, capsys):
    out = tmp_path / "cli"
    assert cli(["init", "--text-tower", str(text_tower), "--vae", str(vae_dir), "--out", str(out),
                "--image-size", "16x8", "--image-size", "16"]) == 0
    ckpt = load_checkpoint(out)
    assert ckpt.config.image_sizes == [(8, 16), (16, 16)]
    assert ckpt.vae is not None and ckpt.eos_token_ids == [3, 4]
    assert not ckpt.config.image_answer.text_first  # images straight after the prompt, as the paper draws them
    assert cli(["init", "--text-tower", str(text_tower), "--vae", str(vae_dir), "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert cli(["init", "--text-tower", str(text_tower), "--vae", str(vae_dir), "--out", str(tmp_path / "first"),
                "--text-first"]) == 0
    assert load_checkpoint(tmp_path / "first", load_vae=False).config.image_answer.text_first


def test_vae_factors_come_from_the_vae_config(checkpoint_dir):
    info = load_checkpoint(checkpoint_dir, load_vae=False).model.vae_info
    assert (info.latent_channels, info.downsample, info.scaling_factor, info.shift_factor) == (4, 2, 0.5, 0.1)


def _corrupt_param(ckpt_dir, name, fn):
    path = ckpt_dir / "vision_tower.safetensors"
    state = load_file(path)
    fn(state, name)
    save_file(state, path)


@pytest.mark.parametrize(
    "breakage, expected",
    [
        (lambda c: (c / "xfusion_config.json").unlink(), ["xfusion_config.json", "missing"]),
        (lambda c: (c / "vision_tower.safetensors").unlink(), ["vision_tower.safetensors", "missing"]),
        (lambda c: shutil.rmtree(c / "vae"), ["vae", "missing"]),
        (lambda c: (c / "text_tower" / "model.safetensors").unlink(), ["text_tower", "safetensors"]),
        (lambda c: (c / "vision_tower.safetensors").write_bytes(b"garbage"), ["vision_tower.safetensors"]),
        (lambda c: _corrupt_param(c, "layers.0.self_attn.q_proj.weight",
                                  lambda s, n: s.__setitem__(n, s[n][:32])),
         ["vision_tower.safetensors", "layers.0.self_attn.q_proj.weight", "(32, 64)", "(64, 64)"]),
        (lambda c: _corrupt_param(c, "patch_embed.weight", lambda s, n: s.pop(n)),
         ["vision_tower.safetensors", "missing parameter 'patch_embed.weight'"]),
        (lambda c: _corrupt_param(c, "layers.9.mlp.up_proj.weight",
                                  lambda s, n: s.__setitem__(n, torch.zeros(2))),
         ["vision_tower.safetensors", "unexpected parameter 'layers.9.mlp.up_proj.weight'"]),
        (lambda c: set_config(c, patch_size="two"), ["xfusion_config.json", "patch_size"]),
        (lambda c: set_config(c, image_sizes=[[10, 10]]), ["xfusion_config.json", "10x10", "multiple of 4"]),
        (lambda c: set_config(c, unknown_field=1), ["xfusion_config.json", "unknown_field"]),
        (lambda c: set_config(c, image_answer={"text_first": True, "max_text_tokens": 0}),
         ["xfusion_config.json", "image_answer.max_text_tokens"]),
        (lambda c: set_config(c, image_answer={"text_frist": True}), ["xfusion_config.json", "text_frist"]),
        (lambda c: (c / "xfusion_config.json").write_text("{"), ["xfusion_config.json", "JSON"]),
    ],
)
def test_bad_checkpoints_name_the_file_and_parameter(checkpoint_dir, breakage, expected):
    breakage(checkpoint_dir)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(checkpoint_dir)
    for part in expected:
        assert part in str(err.value)


def test_vision_tower_from_another_text_tower_is_refused(tmp_path, checkpoint_dir):
    deeper = make_text_tower(tmp_path / "deeper", layers=3)
    set_config(checkpoint_dir, text_tower=str(deeper))
    with pytest.raises(CheckpointError, match=r"vision_tower.safetensors: missing parameter 'layers.2\."):
        load_checkpoint(checkpoint_dir)
    wider = make_text_tower(tmp_path / "wider", hidden=32)
    set_config(checkpoint_dir, text_tower=str(wider))
    with pytest.raises(CheckpointError, match=r"vision_tower.safetensors: parameter '.*' has shape"):
        load_checkpoint(checkpoint_dir)


def test_unknown_dtype_and_non_llama_tower(checkpoint_dir):
    with pytest.raises(CheckpointError, match="unknown dtype 'float8'"):
        load_checkpoint(checkpoint_dir, dtype="float8")
    cfg_path = checkpoint_dir / "text_tower" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model_type"] = "gpt2"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="model_type is 'gpt2'"):
        load_checkpoint(checkpoint_dir)


def test_missing_component_is_not_mistaken_for_a_hub_id(checkpoint_dir):
    set_config(checkpoint_dir, vae="/nonexistent/vae")
    with pytest.raises(CheckpointError, match="missing VAE directory"):
        load_checkpoint(checkpoint_dir)


def test_an_image_size_gives_its_latent_shape_and_token_count():
    from xfusion_serve.model.config import VAEInfo
    from xfusion_serve.model.sequence import image_tokens

    vae = VAEInfo(latent_channels=16, downsample=8, scaling_factor=1.0, shift_factor=0.0)
    assert vae.latent_shape(256, 128) == (16, 32, 16)  # SD3's VAE: 256x128 pixels -> 16 x 32x16 latent
    assert image_tokens(vae.latent_shape(256, 128), 2) == 16 * 8  # 2x2 patches
    assert image_tokens(torch.zeros(1, 16, 32, 16), 2) == 128
