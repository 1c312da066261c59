"""Prompts that hold pictures (conversations, edits): the engine's cached, batched paths against the reference
forward over the whole sequence, and their blocks freed like any other's."""

from __future__ import annotations

import pytest
import torch
from conftest import reference_greedy
from test_engine import OTHERS, assert_all_free, final_latents, make_engine, run_text

from xfusion_serve import ImageSegment, SamplingParams
from xfusion_serve.demo.shapes import sample as shape_sample
from xfusion_serve.engine.flow_matching import initial_noise
from xfusion_serve.engine.kv_cache import KVPool
from xfusion_serve.model import prompts
from xfusion_serve.model.reference import reference_forward


def pictures(engine, n: int, start: int = 0) -> list[ImageSegment]:
    return [engine.encode_image(shape_sample(7, start + i)[1]) for i in range(n)]


def interleaved(engine, start: int = 0) -> list:
    """text, image, text, image, text: a conversation's shape."""
    a, b = pictures(engine, 2, start)
    return [[2, 7, 9], a, [11, 5, 8], b, [30, 31, 12]]


def test_text_after_interleaved_pictures_equals_the_reference(random_checkpoint_dir):
    engine = make_engine(random_checkpoint_dir)
    first, second = interleaved(engine), interleaved(engine, start=5)
    expected = [reference_greedy(engine.ckpt.model, s, 8, set()) for s in (first, second)]
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    alone = run_text(engine, [first], params)
    together = run_text(engine, [[2, 8, 9]] + [first, second] + [[2, 40, 41, 42]], params)  # with text-only ones
    assert alone[0] == expected[0] and together[1:3] == expected
    assert_all_free(engine)


def test_a_picture_last_in_the_prompt(random_checkpoint_dir):
    engine = make_engine(random_checkpoint_dir)
    segments = [[2, 7], *pictures(engine, 1)]  # the answer follows the image's end-of-image directly
    assert run_text(engine, [segments], SamplingParams(max_tokens=5, ignore_eos=True))[0] == reference_greedy(
        engine.ckpt.model, segments, 5, set())


@pytest.mark.parametrize("fixture", ["random_checkpoint_dir", "xfuse_checkpoint_dir"])
def test_one_denoising_step_over_a_prompt_with_pictures_equals_the_reference(fixture, request):
    engine = make_engine(request.getfixturevalue(fixture))
    model = engine.ckpt.model
    if model.config.xfuse:
        with torch.no_grad():
            model.vision.xfuse_alpha.fill_(0.6)
            model.vision.xfuse_beta.fill_(0.7)
    prompt = interleaved(engine)
    req = engine.requests[engine.add_image(prompt, seed=3, steps=1, guidance_scale=1.0)]
    x = req.latents[0].clone()
    engine.step()  # prompt prefilled, one Euler step from sigma 1 to 0: x_0 = x_1 - v
    _, velocities = reference_forward(model, prompt + [ImageSegment(x, 1.0)])
    torch.testing.assert_close(x - req.latents[0], velocities[-1], atol=1e-4, rtol=1e-4)
    engine.run([req.id])
    assert_all_free(engine)


def test_a_seeded_edit_is_the_same_alone_and_batched_with_plain_generations(random_checkpoint_dir):
    engine = make_engine(random_checkpoint_dir)
    (picture,) = pictures(engine, 1)
    edit = {"prompt": [prompts.generation_prompt(engine.tokenizer, "make it blue"), picture], "seed": 5,
            "steps": 3, "guidance_scale": 2.0}
    alone = final_latents(engine, [edit])[0]
    batched = final_latents(engine, OTHERS[:2] + [edit] + OTHERS[2:])[2]
    assert (alone - batched).abs().max() < 1e-4
    other_picture = final_latents(engine, [edit | {"prompt": [edit["prompt"][0], *pictures(engine, 1, 3)]}])[0]
    assert (other_picture - alone).abs().max() > 1e-3  # the picture is really in the prompt
    noise = initial_noise(alone.shape[1:], 5)
    assert (alone[0] - noise).abs().max() > 1e-3
    assert_all_free(engine)


def test_requests_with_the_same_pictures_share_their_cached_prompt(random_checkpoint_dir):
    engine = make_engine(random_checkpoint_dir)
    prompt = interleaved(engine)
    same = [engine.requests[engine.add_image(interleaved(engine), seed=s, steps=2)] for s in (1, 2)]
    other = engine.requests[engine.add_image(interleaved(engine, start=3), seed=1, steps=2)]
    engine.step()
    assert same[0].tables["cond"] == same[1].tables["cond"] != other.tables["cond"]
    assert same[0].keys["cond"] == same[1].keys["cond"] and len(prompt) == 5
    engine.run([r.id for r in same + [other]])
    assert_all_free(engine)


def test_cancelling_requests_with_pictures_frees_every_block(random_checkpoint_dir):
    engine = make_engine(random_checkpoint_dir)
    text = engine.add_text(interleaved(engine), SamplingParams(max_tokens=50, ignore_eos=True))
    image = engine.add_image(interleaved(engine, start=2), seed=1, steps=10)
    waiting = engine.add_image(interleaved(engine, start=4), seed=1, steps=10)
    engine.step()
    engine.step()
    for rid in (text, image, waiting):
        engine.cancel(rid)
    assert_all_free(engine)


def test_limits_on_a_prompts_pictures_are_clear_errors(random_checkpoint_dir):
    engine = make_engine(random_checkpoint_dir, max_prompt_images=2, max_prompt_image_tokens=40)
    three = [[2], *pictures(engine, 3)]
    with pytest.raises(ValueError, match="3 images in one prompt; at most 2"):
        engine.add_text(three, SamplingParams())
    with pytest.raises(ValueError, match="at most 2"):
        engine.add_image(three)
    engine = make_engine(random_checkpoint_dir, max_prompt_image_tokens=20)  # a 16x16 picture is 16 tokens
    with pytest.raises(ValueError, match="32 tokens; at most 20"):
        engine.add_text([[2], *pictures(engine, 2)], SamplingParams())
    assert not engine.requests


def test_preempted_requests_with_pictures_recompute_the_same_tokens(random_checkpoint_dir):
    roomy = make_engine(random_checkpoint_dir)
    prompts_ = [[[2, 7], *pictures(roomy, 1)], interleaved(roomy, start=2), [[2, 9], *pictures(roomy, 1, 4)]]
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    expected = run_text(roomy, prompts_, params)
    # 20 text blocks of 4 tokens: the three cannot all grow to their full length (9 to 14 blocks) together.
    per_block = KVPool.bytes_per_block(layers=2, kv_heads=2, head_dim=16, block_size=4, dtype=torch.float32)
    tight = make_engine(random_checkpoint_dir, kv_cache_memory=int(20.5 * per_block / 0.75))
    assert tight.runner.pools["text"].blocks.num_blocks == 20
    assert run_text(tight, prompts_, params) == expected
    assert tight.scheduler.preemptions > 0
    assert_all_free(tight)
