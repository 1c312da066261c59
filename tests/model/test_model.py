"""The dual-tower model against transformers (text alone) and against the reference forward (mixed)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_text_tower, make_vae
from transformers import LlamaForCausalLM

from xfusion_serve import ImageSegment, init_checkpoint, load_checkpoint
from xfusion_serve.model.checkpoint import save_vision_tower
from xfusion_serve.model.config import VisionTowerConfig
from xfusion_serve.model.reference import reference_forward, reference_greedy, sequence_mask
from xfusion_serve.model.sequence import attention_mask, padded_forward


def model_forward(model, segments):
    """The batched forward on a batch of one: logits at every position and each image's velocity."""
    seq = model.embed_sequence(segments)
    h = padded_forward(model, seq.embeds[None], seq.positions[None], seq.image_ids[None])[0]
    images = [s for s in segments if isinstance(s, ImageSegment)]
    vel = [model.velocity(h[sl][None], *img.latent.shape[-2:])[0] for sl, img in zip(seq.image_slices, images)]
    return model.text.logits(h), vel


def randomize_vision(model, seed=1):
    """init copies the text blocks; tests perturb the vision tower so the two towers really differ."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.vision.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def latent(model, h=8, w=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(model.vae_info.latent_channels, h, w, generator=g)


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("kv_heads", [1, 2, 4])
@pytest.mark.parametrize("llama3_rope", [True, False])
def test_text_only_logits_equal_transformers(tmp_path, tie, kv_heads, llama3_rope):
    tower = make_text_tower(tmp_path / "llama", tie=tie, kv_heads=kv_heads, llama3_rope=llama3_rope)
    ckpt = init_checkpoint(tower, make_vae(tmp_path / "vae"), tmp_path / "ckpt", image_sizes=[(16, 16)])
    model = load_checkpoint(ckpt, load_vae=False).model
    hf = LlamaForCausalLM.from_pretrained(tower, dtype=torch.float32).eval()
    # Past original_max_position_embeddings (32), so the llama3 scaling of long wavelengths matters.
    ids = torch.randint(0, 96, (1, 60), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(ids).logits[0]
        ours, _ = model_forward(model, [ids[0].tolist()])
        ref, _ = reference_forward(model, [ids[0].tolist()])
    torch.testing.assert_close(ours, expected, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ref, expected, atol=2e-5, rtol=1e-5)


def test_greedy_equals_transformers_and_stops_on_every_eos_id(tmp_path):
    tower = make_text_tower(tmp_path / "llama", eos_ids=[95])
    hf = LlamaForCausalLM.from_pretrained(tower, dtype=torch.float32).eval()
    prompt = torch.tensor([[2, 7, 9, 11, 5]])
    free_run = hf.generate(prompt, max_new_tokens=24, do_sample=False, pad_token_id=1)[0, 5:].tolist()
    assert len(free_run) == 24, "the fixture's model should not stop by itself"
    # Make the second eos id of generation_config.json a token greedy decoding first reaches mid-way.
    k = next(i for i in range(4, 24) if free_run[i] not in free_run[:i])
    stop = free_run[k]
    gen_cfg = json.loads((tower / "generation_config.json").read_text())
    gen_cfg["eos_token_id"] = [95, stop]
    (tower / "generation_config.json").write_text(json.dumps(gen_cfg))

    ckpt = load_checkpoint(init_checkpoint(tower, make_vae(tmp_path / "vae"), tmp_path / "ckpt",
                                           image_sizes=[(16, 16)]), load_vae=False)
    assert ckpt.eos_token_ids == [95, stop]
    hf = LlamaForCausalLM.from_pretrained(tower, dtype=torch.float32).eval()
    expected = hf.generate(prompt, max_new_tokens=24, do_sample=False, pad_token_id=1)[0, 5:].tolist()
    ours = reference_greedy(ckpt.model, [prompt[0].tolist()], 24, set(ckpt.eos_token_ids))
    assert ours == expected
    assert len(ours) == k + 1 and ours[-1] == stop


@pytest.mark.parametrize("fixture", ["checkpoint_dir", "xfuse_checkpoint_dir"])
def test_batched_forward_equals_reference_on_mixed_sequence(request, fixture):
    model = load_checkpoint(request.getfixturevalue(fixture), load_vae=False).model
    randomize_vision(model)
    segments = [[2, 7, 9], ImageSegment(latent(model), t=0.4), [10, 12, 13, 5]]
    with torch.no_grad():
        logits, vel = model_forward(model, segments)
    ref_logits, ref_vel = reference_forward(model, segments)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(vel[0], ref_vel[0], atol=1e-5, rtol=1e-5)
    assert vel[0].shape == segments[1].latent.shape


def test_xfuse_mixes_both_towers(xfuse_checkpoint_dir):
    model = load_checkpoint(xfuse_checkpoint_dir, load_vae=False).model
    randomize_vision(model)
    segments = [[2, 7], ImageSegment(latent(model), t=0.5), [10]]
    base_logits, base_vel = reference_forward(model, segments)
    with torch.no_grad():
        model.vision.xfuse_beta.fill_(0.7)
    logits, vel = reference_forward(model, segments)
    assert not torch.allclose(vel[0], base_vel[0])
    # Text before the image is untouched; text after it sees the changed image tokens.
    torch.testing.assert_close(logits[:3], base_logits[:3])


def test_masks_agree_and_have_the_papers_shape():
    image_ids = torch.tensor([-1, -1, 0, 0, 0, -1, 1, 1, -1])
    ours = attention_mask(image_ids[None])[0, 0]
    assert torch.equal(ours, sequence_mask(image_ids))
    assert ours[2, 4] and ours[4, 2]  # one image's tokens see each other both ways
    assert not ours[4, 6] and ours[6, 4]  # images are causal to each other
    assert not ours[1, 2] and not ours[5, 8]  # text never sees later tokens


def test_image_tokens_see_their_whole_image_and_text_never_sees_the_future(checkpoint_dir):
    model = load_checkpoint(checkpoint_dir, load_vae=False).model
    randomize_vision(model)
    img = latent(model, 4, 4)
    base = [[2, 7, 9], ImageSegment(img, t=0.3), [10, 12]]
    later_patch = img.clone()
    later_patch[:, 2:, 2:] += 1.0  # only the last 2x2 patch of the image changes
    changed = [[2, 7, 9], ImageSegment(later_patch, t=0.3), [10, 12]]
    with torch.no_grad():
        l0, v0 = model_forward(model, base)
        l1, v1 = model_forward(model, changed)
        l2, v2 = model_forward(model, [[2, 7, 9], ImageSegment(img, t=0.3), [10, 40]])
    # Layout: 3 text, boi, 4 image tokens, eoi, 2 text.
    assert not torch.allclose(v0[0][:, :2, :2], v1[0][:, :2, :2])  # the first patch saw the last one
    assert torch.equal(l0[:4], l1[:4])  # text and boi before the image never see it
    assert torch.equal(l0[:10], l2[:10]) and torch.equal(v0[0], v2[0])  # nothing sees a later token


def test_padded_batch_equals_one_at_a_time(checkpoint_dir):
    model = load_checkpoint(checkpoint_dir, load_vae=False).model
    randomize_vision(model)
    seqs = [
        [[2, 7, 9, 11, 13, 5, 6, 7, 8]],
        [[2], ImageSegment(latent(model, 4, 8, seed=3), t=0.0), [9, 10]],
        [ImageSegment(latent(model, 8, 8, seed=4), t=1.0)],
    ]
    inputs = [model.embed_sequence(s) for s in seqs]
    T = max(len(x.positions) for x in inputs)
    pad = lambda x, v: torch.cat([x, x.new_full((T - len(x), *x.shape[1:]), v)])  # noqa: E731
    with torch.no_grad():
        h = padded_forward(model, torch.stack([pad(x.embeds, 0.0) for x in inputs]), torch.stack([pad(x.positions, 0) for x in inputs]),
                  torch.stack([pad(x.image_ids, -1) for x in inputs]),
                  valid=torch.stack([pad(torch.ones(len(x.positions), dtype=torch.bool), False) for x in inputs]))
        for row, (x, s) in enumerate(zip(inputs, seqs)):
            alone = padded_forward(model, x.embeds[None], x.positions[None], x.image_ids[None])[0]
            torch.testing.assert_close(h[row, : len(x.positions)], alone, atol=1e-5, rtol=1e-5)


def test_differently_shaped_vision_tower(tmp_path, text_tower, vae_dir):
    ckpt = init_checkpoint(text_tower, vae_dir, tmp_path / "c", image_sizes=[(16, 16)],
                           vision_tower=VisionTowerConfig(intermediate_size=48, num_attention_heads=2,
                                                          num_key_value_heads=1))
    model = load_checkpoint(ckpt, load_vae=False).model
    assert model.vision.layers[0].mlp.up_proj.out_features == 48
    segments = [[2, 7], ImageSegment(latent(model), t=0.5), [10]]
    with torch.no_grad():
        logits, vel = model_forward(model, segments)
    ref_logits, ref_vel = reference_forward(model, segments)
    torch.testing.assert_close(vel[0], ref_vel[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_loads_and_tracks_float32(checkpoint_dir, dtype):
    full = load_checkpoint(checkpoint_dir, load_vae=False).model
    randomize_vision(full)
    save_vision_tower(full, checkpoint_dir)  # a vision tower with a non-zero output head
    half = load_checkpoint(checkpoint_dir, dtype=str(dtype).removeprefix("torch."), load_vae=False).model
    assert {p.dtype for p in half.parameters()} == {dtype}
    segments = [[2, 7, 9], ImageSegment(latent(full), t=0.5), [10]]
    with torch.no_grad():
        l32, v32 = model_forward(full, segments)
        l16, v16 = model_forward(half, [segments[0], ImageSegment(segments[1].latent.to(dtype), 0.5), segments[2]])
    assert torch.isfinite(l16).all()
    for low, full32 in ((l16, l32), (v16[0], v32[0])):
        assert (low.float() - full32).norm() / full32.norm() < 0.05  # bfloat16 keeps ~3 significant digits
