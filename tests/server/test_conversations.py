"""Whole conversations through real HTTP with the official `openai` client: pictures in any turn, images out of
a chat, image edits; each answer against the reference forward over the conversation's segments."""

from __future__ import annotations

import base64
import io
import json
import time

import httpx
import pytest
from conftest import reference_greedy, run_live
from PIL import Image

from xfusion_serve.demo.shapes import sample as shape_sample
from xfusion_serve.model import prompts
from xfusion_serve.model.reference import reference_forward
from xfusion_serve.model.sequence import image_tokens, sequence_length
from xfusion_serve.server.conversation import RETOKENIZE_SLACK
from xfusion_serve.server.schemas import image_to_base64
from xfusion_serve.server.state import ServerConfig

openai = pytest.importorskip("openai")


@pytest.fixture
def live(random_checkpoint_dir):
    server, thread, url, engine, _ = run_live(random_checkpoint_dir, ServerConfig(served_model_name="tiny"))
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    yield url, engine, client
    server.should_exit = True
    thread.join(10)


def picture(i: int) -> Image.Image:
    return shape_sample(11, i)[1]


def uri(image: Image.Image) -> str:
    return "data:image/png;base64," + image_to_base64(image)


def image_part(image: Image.Image) -> dict:
    return {"type": "image_url", "image_url": {"url": uri(image)}}


def expected_answer(engine, messages: list[dict], images: list[Image.Image], max_new: int) -> tuple[str, int]:
    """The reference answer to a conversation (parts as prompts.conversation takes them) and its prompt length."""
    segments = prompts.conversation(engine.tokenizer, messages, [engine.encode_image(im) for im in images])
    ids = reference_greedy(engine.ckpt.model, segments, max_new, set(engine.ckpt.eos_token_ids))
    return engine.tokenizer.decode(ids, skip_special_tokens=True), sequence_length(segments, 2)


def wait_idle(engine) -> None:
    for _ in range(200):
        if not engine.requests and not engine.scheduler.has_work():
            return
        time.sleep(0.05)


def test_a_second_turn_asks_about_the_first_turns_picture(live):
    url, engine, client = live
    a = picture(0)
    messages = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": [{"type": "text", "text": "what is this"}, image_part(a)]},
                {"role": "assistant", "content": "a red circle"},
                {"role": "user", "content": "and where is it"}]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0)
    wait_idle(engine)
    text, prompt_len = expected_answer(engine, [
        messages[0], {"role": "user", "content": [{"type": "text", "text": "what is this"}, {"type": "image"}]},
        *messages[2:]], [a], 6)
    assert chat.choices[0].message.content == text and chat.usage.prompt_tokens == prompt_len
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0,
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == text


def test_two_pictures_in_one_message_are_both_in_the_prompt(live):
    url, engine, client = live
    a, b = picture(1), picture(2)
    messages = [{"role": "user", "content": [image_part(a), {"type": "text", "text": "and"}, image_part(b)]}]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=5, temperature=0,
                                          logprobs=True, top_logprobs=2)
    wait_idle(engine)
    parts = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"}]}]
    text, prompt_len = expected_answer(engine, parts, [a, b], 5)
    # The first token's log-probabilities: a continuous function of the whole prompt, pictures in their order.
    segments = prompts.conversation(engine.tokenizer, parts, [engine.encode_image(im) for im in (a, b)])
    expected = reference_forward(engine.ckpt.model, segments)[0][-1].log_softmax(-1)
    first = chat.choices[0].logprobs.content[0]
    assert first.logprob == pytest.approx(expected.max().item(), abs=1e-4)
    assert [t.logprob for t in first.top_logprobs] == pytest.approx(expected.topk(2).values.tolist(), abs=1e-4)
    one = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": [image_part(a)]}],
                                         max_tokens=1, temperature=0)
    assert chat.choices[0].message.content == text and chat.usage.prompt_tokens == prompt_len
    assert prompt_len - one.usage.prompt_tokens >= 16 + 2  # the second picture's tokens and its boi/eoi


def images_of(message) -> list[bytes]:
    images = message["images"] if isinstance(message, dict) else message.model_extra["images"]
    assert all(im["type"] == "image_url" and im["image_url"]["url"].startswith("data:image/png;base64,")
               for im in images)
    return [base64.b64decode(im["image_url"]["url"].split(",", 1)[1]) for im in images]


def test_a_chat_can_answer_with_images(live):
    url, engine, client = live
    a = picture(3)
    messages = [{"role": "user", "content": [{"type": "text", "text": "draw it bigger"}, image_part(a)]}]
    extra = {"modalities": ["image"], "num_inference_steps": 2, "seed": 5, "guidance_scale": 2.0}
    chat = client.chat.completions.create(model="tiny", messages=messages, n=2, extra_body=extra)
    message = chat.choices[0].message
    assert message.content == "" and message.role == "assistant"
    pngs = images_of(message)
    assert len(pngs) == 2 and pngs[0] != pngs[1] and pngs[0][:4] == b"\x89PNG"
    # Streamed: the role, one chunk per step, then the same images.
    with httpx.Client(base_url=url, timeout=60) as h:
        body = {"model": "tiny", "messages": messages, "n": 2, "stream": True, **extra}
        chunks = [line[6:] for line in h.post("/v1/chat/completions", json=body).text.splitlines()
                  if line.startswith("data: ")]
        events = [json.loads(c) for c in chunks[:-1]]
        assert chunks[-1] == "[DONE]" and events[0]["choices"][0]["delta"]["role"] == "assistant"
        assert [e["progress"]["step"] for e in events if "progress" in e] == [1, 2]
        assert images_of(events[-1]["choices"][0]["delta"]) == pngs
        # Another picture in the conversation, another image: the picture is part of the prompt.
        other = h.post("/v1/chat/completions", json={**body, "stream": False, "messages": [
            {"role": "user", "content": [{"type": "text", "text": "draw it bigger"}, image_part(picture(4))]}]})
        assert images_of(other.json()["choices"][0]["message"]) != pngs
        # The assistant's images in the history are part of the next prompt.
        history = messages + [{"role": "assistant", "content": "", "images": message.model_extra["images"]},
                              {"role": "user", "content": "what did you draw"}]
        follow = h.post("/v1/chat/completions", json={"model": "tiny", "messages": history, "max_tokens": 2})
        plain = h.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 2, "messages": history[:1] + [
            {"role": "assistant", "content": ""}, history[-1]]})
        assert follow.status_code == 200, follow.text
        assert follow.json()["usage"]["prompt_tokens"] - plain.json()["usage"]["prompt_tokens"] == 2 * (16 + 2)


def png(image: Image.Image) -> io.BytesIO:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    buf.seek(0)
    buf.name = "picture.png"
    return buf


def test_images_edit_with_the_official_client(live):
    url, engine, client = live
    extra = {"num_inference_steps": 2, "seed": 3, "guidance_scale": 2.0}
    edited = client.images.edit(model="tiny", image=png(picture(5)), prompt="make it blue", extra_body=extra)
    again = client.images.edit(model="tiny", image=png(picture(5)), prompt="make it blue", extra_body=extra)
    drawn = client.images.generate(model="tiny", prompt="make it blue", extra_body=extra)
    other = client.images.edit(model="tiny", image=png(picture(6)), prompt="make it blue", extra_body=extra)
    two = client.images.edit(model="tiny", image=[png(picture(5)), png(picture(6))], prompt="make it blue", n=2,
                             extra_body=extra)
    result = edited.data[0].b64_json
    assert result == again.data[0].b64_json  # seeded
    assert result != drawn.data[0].b64_json and result != other.data[0].b64_json  # the picture is in the prompt
    assert len(two.data) == 2 and two.data[0].b64_json not in (result, other.data[0].b64_json)
    with httpx.Client(base_url=url, timeout=60) as h:
        # the same sequence as a conversation that sends the picture and asks for an image answer
        uri = "data:image/png;base64," + base64.b64encode(png(picture(5)).getvalue()).decode()
        chat = h.post("/v1/chat", json={"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": "make it blue"}]}],
            "modalities": ["image"], "steps": 2, "seed": 3, "guidance_scale": 2.0}).json()
        assert chat["choices"][0]["message"]["images"][0]["image_url"]["url"].split(",", 1)[1] == result
        files = [("image", ("a.png", png(picture(5)).getvalue(), "image/png"))]
        form = {"prompt": "make it blue", "stream": "true", "partial_images": "1", **{k: str(v) for k, v in
                                                                                      extra.items()}}
        events = [line[6:] for line in h.post("/v1/images/edits", files=files, data=form).text.splitlines()
                  if line.startswith("data: ")]
        kinds = [json.loads(e)["type"] for e in events[:-1]]
        assert kinds == ["image_edit.partial_image", "image_edit.completed"]
        assert json.loads(events[-2])["b64_json"] == result
        assert h.post("/v1/images/edits", data={"prompt": "x"}, files=[("mask", ("m.png", b"x"))]).status_code == 400
        assert h.post("/v1/images/edits", data={"prompt": "x"}, files=[("other", ("m.png", b"x"))]).status_code == 400
    wait_idle(engine)
    assert not engine.requests


def test_a_chat_can_answer_with_text_and_then_an_image_drawn_after_it(live):
    url, engine, client = live
    messages = [{"role": "user", "content": [image_part(picture(9)), {"type": "text", "text": "draw it"}]}]
    sampling = {"max_tokens": 4, "ignore_eos": True}  # greedy: the native route's default
    image = {"steps": 2, "seed": 6, "guidance_scale": 2.0}
    with httpx.Client(base_url=url, timeout=60) as h:
        def chat(**body):
            r = h.post("/v1/chat", json=body)
            assert r.status_code == 200, r.text
            return r.json()

        text = chat(messages=messages, **sampling)
        said = text["choices"][0]["message"]["content"]
        both = chat(messages=messages, modalities=["text", "image"], **sampling, **image)
        message = both["choices"][0]["message"]
        assert said and message["content"] == said  # the text turn, decoded as a text answer is
        assert both["usage"]["prompt_tokens"] == text["usage"]["prompt_tokens"]
        assert both["usage"]["completion_tokens"] == 4 and both["usage"]["images"] == 1
        assert both["choices"][0]["finish_reason"] == "length"  # the text was cut at max_tokens
        two = chat(messages=messages, modalities=["text", "image"], n=2, **sampling, **image)["choices"][0]["message"]
        assert two["content"] == said and len(images_of(two)) == 2 and images_of(two)[0] == images_of(message)[0]
        bad = h.post("/v1/chat", json={"messages": messages, "modalities": ["text", "image"],
                                       "add_generation_prompt": False})
        assert bad.status_code == 400 and "add_generation_prompt" in bad.text
        # The image is the one drawn after the conversation with the assistant's turn opened by that text ...
        opened = messages + [{"role": "assistant", "content": said}]
        after = chat(messages=opened, modalities=["image"], add_generation_prompt=False,
                     continue_final_message=True, **image)
        assert images_of(message) == images_of(after["choices"][0]["message"])
        # ... which is not the image drawn straight after the user's turn.
        direct = chat(messages=messages, modalities=["image"], **image)
        assert images_of(message) != images_of(direct["choices"][0]["message"])
        # A continued assistant turn: the text continues it, the image follows both.
        started = messages + [{"role": "assistant", "content": "a"}]
        cont = chat(messages=started, modalities=["text", "image"], add_generation_prompt=False,
                    continue_final_message=True, **sampling, **image)["choices"][0]["message"]
        whole = messages + [{"role": "assistant", "content": "a" + cont["content"]}]
        again = chat(messages=whole, modalities=["image"], add_generation_prompt=False,
                     continue_final_message=True, **image)
        assert images_of(cont) == images_of(again["choices"][0]["message"])
        # Streamed: the role, the text as it is written, one chunk per denoising step, the same image, usage.
        body = {"messages": messages, "modalities": ["text", "image"], "stream": True, "temperature": 0,
                "stream_options": {"include_usage": True}, **sampling, **image}
        events = [json.loads(line[6:]) for line in h.post("/v1/chat/completions", json=body).text.splitlines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
        deltas = [e["choices"][0]["delta"] for e in events if e["choices"]]
        assert deltas[0]["role"] == "assistant"
        assert "".join(d.get("content", "") for d in deltas) == said
        assert [e["progress"]["step"] for e in events if "progress" in e] == [1, 2]
        assert images_of(deltas[-1]) == images_of(message)
        assert events[-1]["usage"] == both["usage"]
    wait_idle(engine)
    assert not engine.requests


def test_the_text_before_an_image_leaves_the_image_room_in_the_context(live):
    url, engine, client = live
    messages = [{"role": "user", "content": "draw"}]
    image_len = image_tokens(engine.encode_image(picture(1)).latent, engine.ckpt.config.patch_size) + 2
    context = engine.scheduler.max_model_len
    with httpx.Client(base_url=url, timeout=60) as h:
        prompt = h.post("/v1/chat", json={"messages": messages, "max_tokens": 1}).json()["usage"]["prompt_tokens"]
        body = {"messages": messages, "modalities": ["text", "image"], "max_tokens": 100, "ignore_eos": True,
                "steps": 1}
        try:
            # room for 6 tokens of text (and the slack for tokenizing them again), then the image
            engine.scheduler.max_model_len = prompt + 6 + RETOKENIZE_SLACK + image_len
            r = h.post("/v1/chat", json=body)
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] == 6 and r.json()["choices"][0]["finish_reason"] == "length"
            assert len(images_of(r.json()["choices"][0]["message"])) == 1
            engine.scheduler.max_model_len = prompt + RETOKENIZE_SLACK + image_len  # no room for text
            r = h.post("/v1/chat", json=body)
            assert r.status_code == 400 and "no room" in r.text
        finally:
            engine.scheduler.max_model_len = context
    wait_idle(engine)
    assert not engine.requests


def test_cancelling_a_streamed_image_chat_frees_every_block(live):
    url, engine, client = live
    free = {t: p.blocks.num_free for t, p in engine.runner.pools.items()}
    body = {"model": "tiny", "messages": [{"role": "user", "content": [image_part(picture(7))]}],
            "modalities": ["image"], "num_inference_steps": 200, "stream": True}
    with httpx.Client(base_url=url, timeout=60) as h, h.stream("POST", "/v1/chat/completions", json=body) as r:
        for line in r.iter_lines():
            if '"progress"' in line:
                break  # leaves mid-generation
    wait_idle(engine)
    assert not engine.requests
    pinned = {t: sum(len(engine.scheduler.prompt_cache[k].get(t, [])) for k in engine.scheduler.pinned)
              for t in engine.runner.pools}
    for t, pool in engine.runner.pools.items():
        assert pool.blocks.num_free + pinned[t] >= free[t] and pool.blocks.num_free + pinned[t] == pool.blocks.num_blocks


def test_the_native_chat_route_takes_the_same_conversations(live):
    url, engine, client = live
    messages = [{"role": "user", "content": [image_part(picture(8)), {"type": "text", "text": "what is it"}]}]
    with httpx.Client(base_url=url, timeout=60) as h:
        native = h.post("/v1/chat", json={"messages": messages, "max_tokens": 4}).json()
        openai_ = h.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 4, "temperature": 0})
        assert native["choices"][0]["message"] == openai_.json()["choices"][0]["message"]
        assert native["usage"]["prompt_tokens"] > 16  # the picture's tokens
        drawn = h.post("/v1/chat", json={"messages": messages, "modalities": ["image"], "steps": 1, "seed": 2})
        assert len(images_of(drawn.json()["choices"][0]["message"])) == 1


def test_n_choices_share_one_encoding_of_the_pictures(live, monkeypatch):
    url, engine, client = live
    calls = []
    encode = engine.encode_image
    monkeypatch.setattr(engine, "encode_image", lambda image: calls.append(1) or encode(image))
    messages = [{"role": "user", "content": [image_part(picture(9)), image_part(picture(10))]}]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=3, n=3, temperature=1.0,
                                          seed=4)
    assert len(chat.choices) == 3 and len(calls) == 2  # two pictures, encoded once for the three choices
