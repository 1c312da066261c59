"""Feature alignment (X-Fusion section 7, finding iii; REPA): the loss, the grid resampling, the encoders it
loads, the layer hook, and the loss falling when the projector and the vision tower train on it."""

from __future__ import annotations

import shutil

import pytest
import torch
from alignment_models import KINDS, make_tiny_encoder
from torch import nn

from xfusion_serve import ImageSegment, load_checkpoint
from xfusion_serve.model.latents import encode_images, tensor_to_images
from xfusion_serve.model.sequence import pad_sequences, padded_forward
from xfusion_serve.model.xfusion import XFusionModel
from xfusion_serve.training.alignment import FeatureAlignment, capture_layer_output, grid_for, resample_grid
from xfusion_serve.training.trainer import TrainConfig


@pytest.fixture(scope="module")
def dinov2_dir(tmp_path_factory):
    return make_tiny_encoder(tmp_path_factory.mktemp("enc") / "dinov2", "dinov2")


def test_the_loss_is_minus_one_for_equal_features_zero_for_orthogonal_and_the_mean_negative_cosine(dinov2_dir):
    align = FeatureAlignment(dinov2_dir, hidden_size=32)
    g = torch.Generator().manual_seed(0)
    h, targets = torch.randn(2, 6, 32, generator=g), torch.randn(2, 6, 32, generator=g)
    p = align.projector(h)
    expected = -((p * targets).sum(-1) / (p.norm(dim=-1) * targets.norm(dim=-1))).mean()
    torch.testing.assert_close(align.loss_from_features(h, targets), expected)
    align.projector = nn.Identity()
    assert align.loss_from_features(h, 3 * h).item() == pytest.approx(-1.0, abs=1e-6)
    e = torch.eye(32)
    assert align.loss_from_features(e[None, :4], e[None, 4:8]).item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="image_hidden"):
        align.loss_from_features(torch.zeros(1, 6, 16), targets[:1])
    with pytest.raises(ValueError, match="targets"):
        align.loss_from_features(h, targets[:, :5])


def test_resampling_the_grid_matches_values_by_hand():
    # 2x2 -> 4x4, bilinear with align_corners=False: each axis [p, q] -> [p, .75p+.25q, .25p+.75q, q].
    up = resample_grid(torch.tensor([[0.0, 4.0, 8.0, 12.0]]).reshape(1, 4, 1), (2, 2), (4, 4))
    assert up.reshape(4, 4).tolist() == [[0, 1, 3, 4], [2, 3, 5, 6], [6, 7, 9, 10], [8, 9, 11, 12]]
    # 4x4 -> 2x4 (the test encoders' grid to an 8x16 image's latent grid): rows averaged in pairs.
    grid = torch.arange(16.0).reshape(1, 16, 1)
    down = resample_grid(torch.cat([grid, -grid], dim=-1), (4, 4), (2, 4))  # two channels, row-major tokens
    assert down[0, :, 0].tolist() == [2, 3, 4, 5, 10, 11, 12, 13]
    assert down[0, :, 1].tolist() == [-2, -3, -4, -5, -10, -11, -12, -13]
    assert resample_grid(grid, (4, 4), (4, 4)) is grid
    assert grid_for(8, 8, 16) == (2, 4) and grid_for(16, 64, 64) == (4, 4)
    with pytest.raises(ValueError, match="grid"):
        grid_for(6, 16, 16)


@pytest.mark.parametrize("kind", KINDS)
def test_every_encoder_kind_loads_and_gives_its_patch_features(tmp_path, kind):
    from transformers import AutoImageProcessor, AutoModel

    path = make_tiny_encoder(tmp_path / kind, kind)
    align = FeatureAlignment(path, hidden_size=48).train()
    assert not hasattr(align.encoder, "text_model") and not align.encoder.training
    assert all(not p.requires_grad for p in align.encoder.parameters())
    assert all(p.requires_grad for p in align.projector.parameters())
    assert align.encoder_grid == (4, 4) and align.encoder_size == 32
    # Independently: the processor and the transformers model as they come, CLS token (if any) dropped.
    images = tensor_to_images(torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1)
    pixels = AutoImageProcessor.from_pretrained(path)(images=images, return_tensors="pt").pixel_values
    model = AutoModel.from_pretrained(path)
    model = model.vision_model if hasattr(model, "text_model") else model
    with torch.no_grad():
        tokens = model(pixel_values=pixels).last_hidden_state
    patches = tokens[:, 1:] if kind != "siglip" and kind != "siglip_vision" else tokens
    torch.testing.assert_close(align.target_features(images, (4, 4)), patches, atol=1e-5, rtol=1e-5)
    hidden = torch.randn(2, 8, 48, requires_grad=True)  # an 8x16 image: a 2x4 latent grid
    loss = align.loss(hidden, torch.rand(2, 3, 8, 16) * 2 - 1)
    loss.backward()
    assert loss.shape == () and hidden.grad is not None and all(p.grad is None for p in align.encoder.parameters())


def test_clear_errors(tmp_path, text_tower, dinov2_dir, checkpoint_dir):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        FeatureAlignment(tmp_path / "nowhere", 32)
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        FeatureAlignment(text_tower, 32)
    llama = tmp_path / "llama-with-a-processor"
    llama.mkdir()
    for src in (text_tower / "config.json", dinov2_dir / "preprocessor_config.json"):
        shutil.copy(src, llama)
    with pytest.raises(ValueError, match="not a ViT-style vision model"):
        FeatureAlignment(llama, 32)
    align = FeatureAlignment(dinov2_dir, 32)
    with pytest.raises(ValueError, match="aspect"):
        align.loss(torch.zeros(1, 6, 32), torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="images"):
        align.loss(torch.zeros(1, 16, 32), torch.zeros(1, 16, 16))
    model = load_checkpoint(checkpoint_dir, load_vae=False).model
    for layer in (0, 3):
        with pytest.raises(ValueError, match="from 1 to 2"):
            with capture_layer_output(model, layer):
                pass
    with capture_layer_output(model, 1) as layer, pytest.raises(RuntimeError, match="not captured"):
        layer.hidden
    assert TrainConfig(checkpoint="", out="").align_encoder is None  # off by default
    with pytest.raises(FileNotFoundError, match="nowhere"):
        TrainConfig(checkpoint="", out="", align_encoder=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="align_layer"):
        TrainConfig(checkpoint="", out="", align_layer=0)
    with pytest.raises(ValueError, match="align_weight"):
        TrainConfig(checkpoint="", out="", align_weight=-1.0)
    assert TrainConfig(checkpoint="", out="", align_encoder=str(dinov2_dir)).align_layer == 2


def _batch(model: XFusionModel, latents: torch.Tensor, t: float = 0.5):
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(3))
    seqs = [model.embed_sequence([list(range(5, 7 + b)), ImageSegment((1 - t) * x0 + t * n, t), [8]])  # padded
            for b, (x0, n) in enumerate(zip(latents, noise))]
    return seqs, pad_sequences(seqs)


@pytest.mark.parametrize("layer", [1, 2])
def test_the_hook_takes_the_layers_output_and_changes_nothing(random_checkpoint_dir, layer):
    model = load_checkpoint(random_checkpoint_dir, load_vae=False).model.eval()
    _, inputs = _batch(model, torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(2)))
    with torch.no_grad():
        plain = padded_forward(model, *inputs)
        with capture_layer_output(model, layer) as captured:
            hooked = padded_forward(model, *inputs)
        after = padded_forward(model, *inputs)
        # Independently: the same model cut after `layer` blocks returns that layer's output.
        full = (model.text.model.layers, model.vision.layers)
        model.text.model.layers, model.vision.layers = full[0][:layer], full[1][:layer]
        cut = padded_forward(model, *inputs)
        model.text.model.layers, model.vision.layers = full
    assert torch.equal(plain, hooked) and torch.equal(plain, after)
    assert model.layer_output_hook is None and "layer_output_hook" not in vars(model)
    assert torch.equal(captured.hidden, cut)


def test_the_alignment_loss_falls_when_the_projector_and_vision_tower_train(random_checkpoint_dir, dinov2_dir):
    ckpt = load_checkpoint(random_checkpoint_dir)
    model = ckpt.model.requires_grad_vision_only().train()
    pixels = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(4)) * 2 - 1
    latents = encode_images(ckpt.vae, tensor_to_images(pixels), 16, 16)
    torch.manual_seed(0)
    align = FeatureAlignment(dinov2_dir, model.text_config.hidden_size).train()
    targets = align.target_features(pixels, (4, 4))
    torch.testing.assert_close(align.loss(torch.zeros(4, 16, 64), pixels),
                               align.loss_from_features(torch.zeros(4, 16, 64), targets))
    params = [p for p in model.parameters() if p.requires_grad] + list(align.projector.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3)
    losses = []
    for step in range(30):
        seqs, inputs = _batch(model, latents)  # re-embedded: the patch embedding trains too
        with capture_layer_output(model, 1) as layer:
            padded_forward(model, *inputs)
        hidden = torch.stack([layer.hidden[b, s.image_slices[0]] for b, s in enumerate(seqs)])
        loss = align.loss_from_features(hidden, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if step == 0:  # the first block learns from it, the second (after the aligned layer) does not
            assert model.vision.layers[0].mlp.down_proj.weight.grad.abs().sum() > 0
            assert model.vision.layers[1].mlp.down_proj.weight.grad is None
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses
