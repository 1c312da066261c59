"""The demo's training samples (demo/task_samples.py) are the server's sequences with the right targets."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from conftest import set_config

from xfusion_serve import EMBEDDED_CHECKPOINT, ImageSegment, load_checkpoint
from xfusion_serve.demo.recipe import task_samples
from xfusion_serve.demo.shapes import Shape, read_image
from xfusion_serve.demo.task_samples import MIX, TaskSamples
from xfusion_serve.model import prompts
from xfusion_serve.model.latents import encode_images
from xfusion_serve.server.conversation import Conversation
from xfusion_serve.training.samples import image_answer_sample, text_answer_sample
from xfusion_serve.training.trainer import TrainConfig, train

N = 160


@pytest.fixture(scope="module")
def ckpt():
    return load_checkpoint(EMBEDDED_CHECKPOINT)


def source(ckpt, **kw) -> TaskSamples:
    mix = kw.pop("mix", None)
    src = TaskSamples(TrainConfig(checkpoint="", out="", **kw), mix)
    src.prepare(ckpt, 64, 64, show_progress=False)
    return src


def drawn(src: TaskSamples, step: int, n: int) -> list[tuple]:
    """(kind, task, target image, sample) of the first n places of `step`'s batch."""
    samples = src.batch(step, range(n))
    return [(*src._draw(step, j)[:3], s) for j, s in zip(range(n), samples)]


def images(segments) -> list[ImageSegment]:
    return [s for s in segments if isinstance(s, ImageSegment)]


def latent(ckpt, image) -> torch.Tensor:
    return encode_images(ckpt.vae, [image], 64, 64)[0]


def test_every_kind_is_the_servers_sequence_with_its_target(ckpt):
    """Each sample against the sequence built from its task directly (no cache, pictures encoded alone): the
    conversation tasks as /v1/chat builds them, the plain routes' forms as /v1/generate-image and
    /v1/caption do."""
    src = source(ckpt, caption_dropout=0.0)
    tok, seen = ckpt.tokenizer, Counter()
    for kind, task, target, s in drawn(src, 0, N):
        seen[kind] += 1
        pictures = [ImageSegment(latent(ckpt, p), 0.0) for p in task.pictures]
        for got, want in zip(images(s["segments"]), pictures + [None]):
            if want is not None:
                torch.testing.assert_close(got.latent, want.latent, atol=1e-3, rtol=1e-3)
                assert got.t == 0.0
        if kind in ("draw", "edit", "generate"):
            x0, xt = latent(ckpt, target), images(s["segments"])[-1]
            noise = s["velocity"] + x0
            torch.testing.assert_close((1 - xt.t) * x0 + xt.t * noise, xt.latent, atol=1e-3, rtol=1e-3)
            if kind == "generate":
                want = [prompts.generation_prompt(tok, task.messages[-1]["content"][-1]["text"])]
            else:
                want = image_answer_sample(tok, task.messages, pictures, x0, noise, xt.t)["segments"][:-1]
            assert [p for p in s["segments"][:-1] if not isinstance(p, ImageSegment)] == \
                   [p for p in want if not isinstance(p, ImageSegment)]
            assert "targets" not in s
            read = read_image(target)  # the target is what the task asks for: an edit's, its picture changed
            assert all(read[a] == getattr(task.target, a) for a in task.named)
            if kind == "edit":
                assert target is task.target_image
        elif kind == "caption":
            assert s["segments"][0] == prompts.caption_prefix(tok) and len(s["segments"]) == 3
            assert tok.decode(s["targets"], skip_special_tokens=True) == task.answer
            assert s["targets"][-1] == tok.eos_token_id
        else:
            answer = task.answer
            if kind == "edit-text":  # an edit's text answer: the caption of the picture it will draw
                answer = Shape(**read_image(task.target_image)).caption
            want = text_answer_sample(tok, task.messages, pictures, answer)
            assert s["targets"] == want["targets"]
            assert [p for p in s["segments"] if not isinstance(p, ImageSegment)] == \
                   [p for p in want["segments"] if not isinstance(p, ImageSegment)]
            assert tok.decode(s["targets"], skip_special_tokens=True).strip() == answer
    assert set(seen) == set(MIX)


def test_a_sample_depends_on_its_seed_step_and_place_only(ckpt):
    a = source(ckpt).batch(5, range(3, 9))
    b = source(ckpt).batch(5, range(0, 12, 3))  # other company in the batch, other encodings before
    c = source(ckpt, seed=1).batch(5, range(3, 9))
    for x, y in ((a[0], b[1]), (a[3], b[2])):  # places 3 and 6
        assert [s for s in x["segments"] if not isinstance(s, ImageSegment)] == \
               [s for s in y["segments"] if not isinstance(s, ImageSegment)]
        for p, q in zip(images(x["segments"]), images(y["segments"])):
            torch.testing.assert_close(p.latent, q.latent, atol=1e-3, rtol=1e-3)
    assert [repr(s.get("targets")) + repr(s["segments"][0]) for s in a] != \
           [repr(s.get("targets")) + repr(s["segments"][0]) for s in c]


def test_the_mix_and_the_dropout_hold(ckpt):
    src = source(ckpt, caption_dropout=0.25)
    kinds = Counter()
    dropped = images_answers = 0
    for step in range(4):
        for kind, _, _, s in drawn(src, step, 100):
            kinds[kind] += 1
            if kind in ("draw", "edit", "generate"):
                images_answers += 1
                dropped += s["segments"][:-1] == [prompts.generation_prompt(ckpt.tokenizer, "")]
    total = sum(MIX.values())
    for kind, w in MIX.items():
        assert abs(kinds[kind] / 400 - w / total) < 0.07, (kind, kinds)
    assert 0.15 < dropped / images_answers < 0.35  # the engine's shared empty prompt, for CFG

    only = source(ckpt, mix={"compare": 1.0, "draw": 0.0})
    assert {k for k, *_ in drawn(only, 0, 20)} == {"compare"}
    with pytest.raises(ValueError, match="mix"):
        TaskSamples(TrainConfig(checkpoint="", out=""), {"paint": 1.0})
    with pytest.raises(ValueError, match="mix"):
        TaskSamples(TrainConfig(checkpoint="", out=""), {"draw": 0.0})


def test_caption_noise_noises_only_the_pictures_of_text_answers(ckpt):
    clean = source(ckpt, mix={"question": 1.0, "compare": 1.0, "caption": 1.0, "edit": 1.0})
    noisy = source(ckpt, caption_max_noise=0.5, mix={"question": 1.0, "compare": 1.0, "caption": 1.0, "edit": 1.0})
    for (kind, _, _, c), (_, _, _, n) in zip(drawn(clean, 0, 40), drawn(noisy, 0, 40)):
        if kind == "edit":  # an edit's picture is a prompt's: clean in both
            assert all(p.t == 0.0 for p in images(n["segments"])[:-1])
            continue
        assert all(p.t == 0.0 for p in images(c["segments"]))
        ts = [p.t for p in images(n["segments"])]
        assert all(0.0 < t <= 0.5 for t in ts), ts
        for p, q in zip(images(c["segments"]), images(n["segments"])):
            assert not torch.allclose(p.latent, q.latent)
        assert c["targets"] == n["targets"]


def test_the_recipes_training_is_deterministic_for_a_seed(tmp_path):
    """train() with TaskSamples, twice from the embedded checkpoint: byte-identical vision towers; another
    seed gives other weights."""

    def run(out, seed):
        cfg = TrainConfig(checkpoint=str(EMBEDDED_CHECKPOINT), out=str(tmp_path / out), steps=2, batch_size=8,
                          lr=1e-3, warmup_steps=1, seed=seed, data_seed=seed, progress=False, dataset="shapes-tasks")
        return (train(cfg, samples=TaskSamples(cfg)) / "vision_tower.safetensors").read_bytes()

    first = run("a", 0)
    assert run("b", 0) == first
    assert run("c", 1) != first


def test_caption_first_opens_an_image_answers_turn_with_the_caption_of_what_it_draws(ckpt, checkpoint_dir):
    """With caption_first, a drawing or an edit is drawn after the assistant's turn opened by the target's
    caption, as the server builds it for modalities ["text", "image"]; all else is as without it."""
    kw = dict(caption_dropout=0.0, mix={"draw": 1, "edit": 1, "generate": 1, "question": 1})
    plain, first = source(ckpt, **kw), TaskSamples(TrainConfig(checkpoint="", out="", caption_dropout=0.0),
                                                   kw["mix"], caption_first=True)
    first.prepare(ckpt, 64, 64, show_progress=False)
    tok, opened = ckpt.tokenizer, Counter()
    for (kind, task, _, a), (_, _, _, b) in zip(drawn(plain, 1, 48), drawn(first, 1, 48)):
        if kind in ("draw", "edit"):
            opened[kind] += 1
            # as the chat route builds the image's prompt after its text (server/chat.py, add_conversation)
            said = Conversation(task.messages, [], images(b["segments"])[:-1]).answered_with(task.target.caption, False)
            want = prompts.conversation(tok, said.messages, said.pictures, add_generation_prompt=False,
                                        continue_final_message=True)
            assert [p for p in b["segments"][:-1] if not isinstance(p, ImageSegment)] == \
                   [p for p in want if not isinstance(p, ImageSegment)]
            assert [isinstance(p, ImageSegment) for p in b["segments"][:-1]] == \
                   [isinstance(p, ImageSegment) for p in want]
            assert tok.decode(b["segments"][-2]).endswith(task.target.caption)
            torch.testing.assert_close(b["velocity"], a["velocity"])
        else:
            assert [p for p in b["segments"] if not isinstance(p, ImageSegment)] == \
                   [p for p in a["segments"] if not isinstance(p, ImageSegment)]
    assert opened["draw"] and opened["edit"]
    # The recipe's samples answer as the checkpoint says it answers (image_answer.text_first, set at init).
    for text_first in (False, True):
        set_config(checkpoint_dir, image_answer={"text_first": text_first})
        assert task_samples(TrainConfig(checkpoint=str(checkpoint_dir), out="")).caption_first is text_first
    # The unconditional branch of CFG stays the engine's shared empty prompt.
    dropped = TaskSamples(TrainConfig(checkpoint="", out="", caption_dropout=1.0), {"draw": 1}, caption_first=True)
    dropped.prepare(ckpt, 64, 64, show_progress=False)
    assert all(s["segments"][0] == prompts.generation_prompt(tok, "") for s in dropped.batch(0, range(4)))


def test_text_answers_carry_their_last_pictures_clean_latent(ckpt):
    """What the feature alignment aligns to: the clean latent, also when the pictures are noised."""
    cfg = TrainConfig(checkpoint="", out="", caption_max_noise=1.0)
    samples = TaskSamples(cfg)
    samples.prepare(ckpt, *ckpt.config.image_sizes[0], show_progress=False)
    seen = 0
    for j in range(40):
        s = samples.batch(0, range(j, j + 1))[0]
        images = [g for g in s["segments"] if isinstance(g, ImageSegment)]
        if "targets" in s and images:
            assert images[-1].t > 0 and not torch.equal(s["x0"], images[-1].latent)
            seen += 1
    assert seen > 0
