"""What real OpenAI clients rely on, each a kind seen in public bug reports of peer servers, on every route."""

from __future__ import annotations

import io
import json

import pytest
from conftest import reference_greedy, run_live
from fastapi.testclient import TestClient
from test_server import sse_events

from xfusion_serve import Engine, EngineConfig, load_checkpoint
from xfusion_serve.demo.shapes import sample as shape_sample
from xfusion_serve.model.prompts import chat_prompt
from xfusion_serve.server.app import create_app
from xfusion_serve.server.state import ServerConfig

CHAT = {"messages": [{"role": "user", "content": "a red circle"}], "max_tokens": 3}
COMPLETION = {"prompt": "a red", "max_tokens": 3}
IMAGE = {"prompt": "a red circle", "num_inference_steps": 1}


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from conftest import make_text_tower, make_vae

    from xfusion_serve import init_checkpoint

    root = tmp_path_factory.mktemp("ckpt")
    path = init_checkpoint(make_text_tower(root / "text"), make_vae(root / "vae"), root / "ckpt",
                           image_sizes=[(16, 16)])
    engine = Engine(load_checkpoint(path), EngineConfig(block_size=4))
    with TestClient(create_app(ServerConfig(served_model_name="tiny"), engine=engine)) as c:
        c.engine = engine
        yield c


def edit(client, fields: dict):
    buf = io.BytesIO()
    shape_sample(2, 0)[1].save(buf, format="PNG")
    return client.post("/v1/images/edits", files=[("image", ("a.png", buf.getvalue(), "image/png"))],
                       data={k: str(v) for k, v in fields.items()})


@pytest.mark.parametrize("route, body", [
    ("/v1/completions", COMPLETION | {"max_tokens": None, "temperature": None, "stop": None, "seed": None,
                                      "ignore_eos": True}),
    ("/v1/chat/completions", CHAT | {"max_tokens": None, "n": None, "stream_options": None, "top_p": None,
                                     "logprobs": None, "modalities": None, "ignore_eos": True}),
    ("/v1/chat", CHAT | {"max_tokens": None, "stop": None, "temperature": None}),
    ("/v1/images/generations", IMAGE | {"size": None, "seed": None, "n": None, "negative_prompt": None}),
    ("/v1/generate-image", IMAGE | {"steps": None, "size": None, "guidance_scale": None}),
    ("/v1/caption", {"image": "", "prompt": None, "max_tokens": None}),
])
def test_an_explicit_null_means_the_default(client, route, body):
    if route == "/v1/caption":
        from xfusion_serve.server.schemas import image_to_base64
        body = body | {"image": image_to_base64(shape_sample(2, 1)[1])}
    r = client.post(route, json=body)
    assert r.status_code == 200, r.text
    if route == "/v1/completions":  # the default max_tokens (16), not a refusal
        assert r.json()["usage"]["completion_tokens"] == 16


ACCEPTED = [("frequency_penalty", 0), ("presence_penalty", 0.0), ("logit_bias", {}), ("store", False),
            ("tools", []), ("tool_choice", "none"), ("response_format", {"type": "text"}),
            ("parallel_tool_calls", True), ("service_tier", "auto"), ("metadata", {}), ("user", "u-1"),
            ("stream_options", {"include_usage": False})]
REFUSED = [("frequency_penalty", 0.5), ("presence_penalty", -1.0), ("logit_bias", {"5": 10}), ("store", True),
           ("tools", [{"type": "function", "function": {"name": "f"}}]), ("response_format", {"type": "json_object"}),
           ("reasoning_effort", "high"), ("tool_choice", "required")]


@pytest.mark.parametrize("route, base", [("/v1/chat/completions", CHAT), ("/v1/completions", COMPLETION)])
def test_openai_fields_that_change_nothing_pass_and_others_are_named(client, route, base):
    for name, value in ACCEPTED:
        assert client.post(route, json=base | {name: value}).status_code == 200, (name, value)
    for name, value in REFUSED:
        r = client.post(route, json=base | {name: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == name, (name, value, r.text)
        assert name in r.json()["error"]["message"]
    r = client.post(route, json=base | {"frequency_penaltyy": 0})  # not OpenAI's: refused as unknown
    assert r.status_code == 422 and "frequency_penaltyy" in r.json()["error"]["message"]


def test_legacy_completion_fields_at_their_defaults(client):
    for name, value in [("best_of", 1), ("echo", False), ("suffix", "")]:
        assert client.post("/v1/completions", json=COMPLETION | {name: value}).status_code == 200, name
    for name, value in [("best_of", 2), ("echo", True), ("suffix", "end")]:
        r = client.post("/v1/completions", json=COMPLETION | {name: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == name, name


def test_a_model_that_is_not_served_is_a_404_naming_the_served_one(client):
    for route, body in [("/v1/chat/completions", CHAT), ("/v1/completions", COMPLETION),
                        ("/v1/images/generations", IMAGE)]:
        r = client.post(route, json=body | {"model": "gpt-4o"})
        assert r.status_code == 404 and r.json()["error"]["param"] == "model", (route, r.text)
        assert "'tiny'" in r.json()["error"]["message"] and "gpt-4o" in r.json()["error"]["message"]
        ok = client.post(route, json=body | {"model": "tiny"})
        assert ok.status_code == 200 and ok.json().get("model", "tiny") == "tiny"
    assert edit(client, IMAGE | {"model": "gpt-4o"}).status_code == 404
    assert edit(client, IMAGE | {"model": "tiny"}).status_code == 200
    assert client.get("/v1/models/gpt-4o").status_code == 404
    assert client.get("/v1/models/tiny").json()["id"] == "tiny"


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "text/plain; charset=utf-8"])
def test_json_sent_without_its_content_type_is_read_as_json(client, content_type):
    headers = {"content-type": content_type} if content_type else {}
    for route, body in [("/v1/chat/completions", CHAT), ("/v1/completions", COMPLETION), ("/v1/chat", CHAT),
                        ("/v1/images/generations", IMAGE)]:
        r = client.post(route, content=json.dumps(body).encode(), headers=headers)
        assert r.status_code == 200, (route, content_type, r.text)
    bad = client.post("/v1/completions", content=b"prompt=a&max_tokens=3", headers=headers)
    assert bad.status_code == 422 and "not valid JSON" in bad.json()["error"]["message"]
    assert repr(content_type or "(none)") in bad.json()["error"]["message"]  # the type it was sent as


def test_n_choices_each_with_its_own_seed_streamed_alike(client):
    body = CHAT | {"max_tokens": 6, "temperature": 1.0, "seed": 7, "ignore_eos": True}
    many = client.post("/v1/chat/completions", json=body | {"n": 3}).json()
    assert [c["index"] for c in many["choices"]] == [0, 1, 2]
    singles = [client.post("/v1/chat/completions", json=body | {"seed": 7 + i}).json() for i in range(3)]
    assert [c["message"]["content"] for c in many["choices"]] == [s["choices"][0]["message"]["content"]
                                                                  for s in singles]
    assert many["usage"]["completion_tokens"] == 18
    events = sse_events(client.post("/v1/chat/completions", json=body | {"n": 3, "stream": True}))
    texts = ["", "", ""]
    for e in events[:-1]:
        for c in e["choices"]:
            texts[c["index"]] += c["delta"].get("content", "")
    assert texts == [c["message"]["content"] for c in many["choices"]]
    assert sum(e["choices"][0]["delta"] == {"role": "assistant", "content": ""} for e in events[:-1]) == 3
    completions = client.post("/v1/completions", json=COMPLETION | {"n": 2, "temperature": 1.0, "seed": 7}).json()
    assert [c["index"] for c in completions["choices"]] == [0, 1]


def test_logprobs_on_chat_and_completions(client):
    r = client.post("/v1/completions", json=COMPLETION | {"max_tokens": 4, "temperature": 0, "logprobs": 2,
                                                          "ignore_eos": True}).json()
    lp = r["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 4
    text = r["choices"][0]["text"]
    assert "".join(lp["tokens"]) == text  # each token's text as it reads in the answer, spaces included
    assert all(text[o:].startswith(t) for o, t in zip(lp["text_offset"], lp["tokens"]))
    for chosen, top in zip(lp["token_logprobs"], lp["top_logprobs"]):  # greedy: the chosen is the likeliest
        assert 1 <= len(top) <= 2 and chosen == pytest.approx(max(top.values())) and chosen <= 0  # keyed by text
    chat = client.post("/v1/chat/completions", json=CHAT | {"temperature": 0, "logprobs": True, "top_logprobs": 3,
                                                            "ignore_eos": True}).json()
    content = chat["choices"][0]["logprobs"]["content"]
    assert len(content) == 3 and all(len(c["top_logprobs"]) == 3 for c in content)
    assert "".join(c["token"] for c in content) == chat["choices"][0]["message"]["content"]
    assert all(c["bytes"] == list(c["token"].encode()) for c in content)
    plain = client.post("/v1/chat/completions", json=CHAT).json()
    assert plain["choices"][0]["logprobs"] is None
    assert client.post("/v1/chat/completions", json=CHAT | {"top_logprobs": 2}).status_code == 400
    streamed = sse_events(client.post("/v1/completions", json=COMPLETION | {
        "max_tokens": 4, "temperature": 0, "logprobs": 1, "ignore_eos": True, "stream": True}))
    offsets = [o for e in streamed[:-1] if e["choices"][0]["logprobs"] for o in e["choices"][0]["logprobs"]["text_offset"]]
    assert offsets == lp["text_offset"]
    assert [t for e in streamed[:-1] if e["choices"][0]["logprobs"] for t in e["choices"][0]["logprobs"]["tokens"]] \
        == lp["tokens"]


def test_continue_final_message_and_add_generation_prompt(client):
    engine, tok = client.engine, client.engine.tokenizer
    messages = [{"role": "user", "content": "a red circle"}, {"role": "assistant", "content": "the small"}]
    r = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 4, "temperature": 0,
                                                   "continue_final_message": True, "add_generation_prompt": False})
    ids = chat_prompt(tok, messages, continue_final_message=True)
    assert r.json()["usage"]["prompt_tokens"] == len(ids)
    expected = reference_greedy(engine.ckpt.model, [ids], 4, set(engine.ckpt.eos_token_ids))
    assert r.json()["choices"][0]["message"]["content"] == tok.decode(expected, skip_special_tokens=True)
    closed = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 1,
                                                        "add_generation_prompt": False})
    assert closed.json()["usage"]["prompt_tokens"] == len(chat_prompt(tok, messages, add_generation_prompt=False))
    wrong = client.post("/v1/chat/completions", json={"messages": messages[:1], "continue_final_message": True})
    assert wrong.status_code == 400 and "assistant message last" in wrong.json()["error"]["message"]


def test_the_official_clients_stream_helper_keeps_the_role_for_the_next_turn(random_checkpoint_dir):
    openai = pytest.importorskip("openai")
    server, thread, url, engine, _ = run_live(random_checkpoint_dir, ServerConfig(served_model_name="tiny"))
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        messages = [{"role": "user", "content": "a red circle"}]
        with client.chat.completions.stream(model="tiny", messages=messages, max_tokens=3) as stream:
            for _ in stream:
                pass
            reply = stream.current_completion_snapshot.choices[0].message  # what the helper put together
        assert reply.role == "assistant"
        follow = client.chat.completions.create(model="tiny", max_tokens=2, messages=messages + [
            reply.model_dump(exclude_none=True), {"role": "user", "content": "and"}])
        assert follow.choices[0].finish_reason in ("stop", "length")
    finally:
        server.should_exit = True
        thread.join(10)
