"""The scheduler's bookkeeping: a cancelled waiting request never runs, the unconditional prompt stays
pinned and a request's own negative prompt does not."""

from __future__ import annotations

from test_engine import assert_all_free, make_engine

from xfusion_serve import SamplingParams
from xfusion_serve.model import prompts


def test_a_cancelled_waiting_request_leaves_the_queue_at_once_and_is_never_prefilled(random_checkpoint_dir):
    engine = make_engine(random_checkpoint_dir, max_running=1)
    prefilled = []
    engine.fault_hook = lambda phase, reqs: prefilled.extend(r.id for r in reqs) if phase == "prefill" else None
    running = engine.add_text([2, 7, 9], SamplingParams(max_tokens=6, ignore_eos=True))
    waiting = engine.add_text([2, 8, 10], SamplingParams(max_tokens=6, ignore_eos=True))
    after = engine.add_text([2, 11], SamplingParams(max_tokens=2, ignore_eos=True))
    engine.step()  # the first one runs; the other two wait for its place
    assert [r.id for r in engine.scheduler.waiting] == [waiting, after]
    engine.cancel(waiting)
    assert [r.id for r in engine.scheduler.waiting] == [after]  # at once, not at the next step
    done = engine.run([running, after])
    assert waiting not in prefilled and {running, after} <= set(prefilled) and set(done) == {running, after}
    assert_all_free(engine)


def test_only_the_unconditional_prompt_stays_pinned(random_checkpoint_dir):
    engine = make_engine(random_checkpoint_dir)
    empty = tuple(prompts.generation_prompt(engine.tokenizer, ""))
    first = engine.requests[engine.add_image("a red circle", negative_prompt="blue", seed=1, steps=2)]
    engine.step()
    negative = first.keys["uncond"]
    assert negative != empty and negative in engine.scheduler.prompt_cache
    engine.run([first.id])
    assert negative not in engine.scheduler.prompt_cache  # its own negative prompt: gone with it
    second = engine.requests[engine.add_image("a blue square", seed=2, steps=2, guidance_scale=3.0)]
    engine.step()
    assert engine.scheduler.pinned == {empty} and second.tables["uncond"] == engine.scheduler.prompt_cache[empty]
    blocks = engine.scheduler.prompt_cache[empty]
    engine.run([second.id])
    third = engine.requests[engine.add_image("a green triangle", seed=3, steps=2, guidance_scale=3.0)]
    engine.step()
    assert engine.scheduler.prompt_cache[empty] == blocks and third.tables["uncond"] == blocks  # kept across
    engine.run([third.id])
    assert_all_free(engine)


def test_without_a_bos_a_one_token_negative_prompt_is_not_pinned(random_checkpoint_dir):
    engine = make_engine(random_checkpoint_dir)
    engine.tokenizer.bos_token = None  # a tokenizer with no <bos>: the empty prompt is no token at all
    assert prompts.generation_prompt(engine.tokenizer, "") == []
    first = engine.requests[engine.add_image("a red circle", negative_prompt="blue", seed=1, steps=2)]
    negative = first.keys["uncond"]
    assert len(negative) == 1
    engine.run([first.id])
    assert negative not in engine.scheduler.prompt_cache and not engine.scheduler.pinned
    engine.run([engine.add_image("a red circle", seed=1, steps=2, guidance_scale=2.0)])
    assert engine.scheduler.pinned == {()}


def test_an_image_prompt_longer_than_the_context_is_refused(random_checkpoint_dir):
    engine = make_engine(random_checkpoint_dir)
    limit = engine.scheduler.max_model_len
    fits = engine.add_image([[2] * (limit - 16 - 2)], seed=1, steps=1)  # prompt, <boi>, 16 tokens, <eoi>
    over = engine.add_image([[2] * (limit - 16 - 1)], seed=1, steps=1)
    done = engine.run([fits, over])
    assert done[fits].finish_reason == "stop"
    assert done[over].finish_reason == "error" and "longer than the model's context" in done[over].error
    assert_all_free(engine)
