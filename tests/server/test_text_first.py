"""A checkpoint trained to say what it draws before drawing it (image_answer.text_first): every image route
decodes the assistant's text first and draws after it, exactly as chat's modalities ["text", "image"] does."""

from __future__ import annotations

import base64
import io
import json

import httpx
import pytest
from conftest import run_live, set_config

from xfusion_serve.demo.shapes import sample as shape_sample
from xfusion_serve.model.config import ImageAnswer
from xfusion_serve.model.sequence import image_tokens
from xfusion_serve.server.schemas import image_to_base64
from xfusion_serve.server.state import ServerConfig

MAX_TEXT = 4
IMAGE = {"steps": 2, "seed": 6, "guidance_scale": 2.0}


@pytest.fixture
def live(random_checkpoint_dir):
    set_config(random_checkpoint_dir, image_answer={"text_first": True, "max_text_tokens": MAX_TEXT})
    server, thread, url, engine, app = run_live(random_checkpoint_dir, ServerConfig(served_model_name="tiny"))
    with httpx.Client(base_url=url, timeout=60) as h:
        yield h, app.state.server
    server.should_exit = True
    thread.join(10)


def post(h, path: str, method: str = "POST", **kw) -> dict:
    r = h.request(method, path, **kw)
    assert r.status_code == 200, r.text
    return r.json()


def chat_image(chat: dict) -> str:
    return chat["choices"][0]["message"]["images"][0]["image_url"]["url"].split(",", 1)[1]


def png(i: int) -> bytes:
    buf = io.BytesIO()
    shape_sample(11, i)[1].save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("prompt", ["green", "a large blue square at top left"])  # greedy text: "small left", "at"
def test_every_generation_route_draws_after_the_assistants_text(live, prompt):
    h, server = live
    user = [{"role": "user", "content": prompt}]
    # What chat gives when the text is asked for: greedy, as long as the checkpoint's text before an image.
    both = post(h, "/v1/chat", json={"messages": user, "modalities": ["text", "image"], "max_tokens": MAX_TEXT,
                                     **IMAGE})
    said, image = both["choices"][0]["message"]["content"], chat_image(both)
    oai = post(h, "/v1/images/generations", json={"prompt": prompt, "num_inference_steps": 2, "seed": 6,
                                                  "guidance_scale": 2.0})["data"][0]
    native = post(h, "/v1/generate-image", json={"prompt": prompt, **IMAGE})["data"][0]
    only = post(h, "/v1/chat", json={"messages": user, "modalities": ["image"], **IMAGE})
    # OpenAI's chat samples at temperature 1 by default: text the client did not ask for is greedy all the same
    oai_chat = post(h, "/v1/chat/completions", json={"messages": user, "modalities": ["image"], **IMAGE})
    assert said.strip()  # the text is there, so the images below depend on it
    assert oai["revised_prompt"] == native["revised_prompt"] == only["choices"][0]["message"]["content"] == said
    assert oai_chat["choices"][0]["message"]["content"] == said
    assert oai["b64_json"] == native["b64_json"] == chat_image(only) == chat_image(oai_chat) == image
    # Streamed, the same image and text.
    for path, body in (("/v1/generate-image", {"prompt": prompt, "stream": True, **IMAGE}),
                       ("/v1/images/generations", {"prompt": prompt, "stream": True, "num_inference_steps": 2,
                                                   "seed": 6, "guidance_scale": 2.0})):
        events = [json.loads(line[6:]) for line in h.post(path, json=body).text.splitlines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
        done = events[-1]["data"][0] if path == "/v1/generate-image" else events[-1]
        assert done["b64_json"] == image and done["revised_prompt"] == said, path
    # A checkpoint that draws straight after the prompt: the prompt is the revised_prompt, another image.
    server.image_answer = ImageAnswer()
    direct = post(h, "/v1/generate-image", json={"prompt": prompt, **IMAGE})["data"][0]
    assert direct["revised_prompt"] == prompt and direct["b64_json"] != image


def test_an_edit_draws_after_the_assistants_text_about_the_picture(live):
    h, server = live
    uri = "data:image/png;base64," + base64.b64encode(png(5)).decode()
    user = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                         {"type": "text", "text": "make it blue"}]}]
    both = post(h, "/v1/chat", json={"messages": user, "modalities": ["text", "image"], "max_tokens": MAX_TEXT,
                                     **IMAGE})
    form = {"prompt": "make it blue", "num_inference_steps": "2", "seed": "6", "guidance_scale": "2.0"}
    edited = post(h, "/v1/images/edits", files=[("image", ("a.png", png(5), "image/png"))], data=form)["data"][0]
    assert edited["revised_prompt"] == both["choices"][0]["message"]["content"]
    assert edited["b64_json"] == chat_image(both)
    other = post(h, "/v1/images/edits", files=[("image", ("a.png", png(6), "image/png"))], data=form)["data"][0]
    assert other["b64_json"] != edited["b64_json"]  # the picture is in the prompt
    server.image_answer = ImageAnswer()  # straight after the user's turn: the picture's edit as chat draws it
    direct = post(h, "/v1/images/edits", files=[("image", ("a.png", png(5), "image/png"))], data=form)["data"][0]
    straight = post(h, "/v1/chat", json={"messages": user, "modalities": ["image"], **IMAGE})
    assert direct["revised_prompt"] == "make it blue" and direct["b64_json"] == chat_image(straight)
    assert direct["b64_json"] != edited["b64_json"]


def test_the_text_before_an_image_is_the_checkpoints_unless_the_client_asked_for_text(live):
    """Asked for (["text", "image"]), the text takes the request's sampling and max_tokens; not asked for, it
    is greedy and at most image_answer.max_text_tokens, whatever the request's sampling says."""
    h, server = live
    user = [{"role": "user", "content": "green"}]
    body = {"messages": user, "max_tokens": 9, "ignore_eos": True, **IMAGE}
    only = post(h, "/v1/chat", json=body | {"modalities": ["image"], "temperature": 1.5})
    asked = post(h, "/v1/chat", json=body | {"modalities": ["text", "image"]})
    assert only["usage"]["completion_tokens"] == MAX_TEXT and asked["usage"]["completion_tokens"] == 9
    assert only["choices"][0]["message"]["content"] == asked["choices"][0]["message"]["content"][:len(
        only["choices"][0]["message"]["content"])]  # greedy: the asked-for text's start
    card = post(h, "/v1/models", method="GET")["data"][0]
    assert card["image_answer"] == {"text_first": True, "max_text_tokens": MAX_TEXT}
    # No assistant turn opened: an image straight after the conversation as it stands, no text.
    raw = post(h, "/v1/chat", json={"messages": user, "modalities": ["image"], "add_generation_prompt": False,
                                    **IMAGE})
    assert raw["choices"][0]["message"]["content"] == "" and raw["usage"]["completion_tokens"] == 0
    assert chat_image(raw) != chat_image(only)


def test_an_image_route_without_room_for_the_text_and_the_image_is_a_400(live):
    h, server = live
    engine = server.engine.engine
    image_len = image_tokens(engine.ckpt.model.vae_info.latent_shape(16, 16), engine.ckpt.config.patch_size) + 2
    context = engine.scheduler.max_model_len
    try:
        engine.scheduler.max_model_len = image_len + 3  # shorter than the user's turn and the image
        prompt = "a large blue square at top left"
        for path in ("/v1/images/generations", "/v1/generate-image"):
            r = h.post(path, json={"prompt": prompt})
            assert r.status_code == 400 and "no room" in r.text, r.text
        r = h.post("/v1/images/edits", files=[("image", ("a.png", png(5), "image/png"))], data={"prompt": prompt})
        assert r.status_code == 400 and "no room" in r.text, r.text
        r = h.post("/v1/chat", json={"messages": [{"role": "user", "content": prompt}], "modalities": ["image"]})
        assert r.status_code == 400 and "no room" in r.text, r.text
    finally:
        engine.scheduler.max_model_len = context
