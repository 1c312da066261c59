"""The OpenAI-compatible routes: shapes the official client expects, greedy equal to transformers."""

from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient
from test_server import sse_events
from transformers import LlamaForCausalLM

from xfusion_serve import Engine, EngineConfig, load_checkpoint
from xfusion_serve.model.prompts import chat_prompt
from xfusion_serve.server.app import create_app
from xfusion_serve.server.state import ServerConfig


@pytest.fixture
def client(random_checkpoint_dir):
    engine = Engine(load_checkpoint(random_checkpoint_dir), EngineConfig(block_size=4))
    with TestClient(create_app(ServerConfig(served_model_name="tiny"), engine=engine)) as c:
        c.engine = engine
        yield c


def greedy(engine, ids, n):
    hf = LlamaForCausalLM.from_pretrained(engine.ckpt.text_tower_dir, dtype=torch.float32).eval()
    out = hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=1)[0, len(ids):].tolist()
    return out[: next((i for i, t in enumerate(out) if t in engine.ckpt.eos_token_ids), len(out))]


def test_completions_and_chat_completions_are_transformers_greedy(client):
    tok = client.engine.tokenizer
    r = client.post("/v1/completions", json={"prompt": "a small red", "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    expected = greedy(client.engine, tok("a small red").input_ids, 8)
    assert r.json()["choices"][0]["text"] == tok.decode(expected, skip_special_tokens=True)
    assert r.json()["object"] == "text_completion" and r.json()["model"] == "tiny"

    messages = [{"role": "user", "content": "the blue square"}]
    r = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 8, "temperature": 0})
    expected = greedy(client.engine, chat_prompt(tok, messages), 8)
    assert r.json()["choices"][0]["message"]["content"] == tok.decode(expected, skip_special_tokens=True)
    assert r.json()["usage"]["completion_tokens"] == len(expected)


def test_chat_completions_stream_with_usage(client):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    events = sse_events(client.post("/v1/chat/completions", json=body))
    assert events[-1] == "[DONE]"
    assert events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] == 5
    assert events[-3]["choices"][0]["finish_reason"] == "length"
    assert all(e["object"] == "chat.completion.chunk" for e in events[:-1])


def test_image_urls_are_data_uris_or_from_allowed_domains(client):
    remote = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}]}]
    r = client.post("/v1/chat/completions", json={"messages": remote})
    assert r.status_code == 400 and "not allowed" in r.json()["error"]["message"]
    broken = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]
    assert client.post("/v1/chat/completions", json={"messages": broken}).status_code == 400
    many = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}] * 9}]
    r = client.post("/v1/chat/completions", json={"messages": many})  # EngineConfig.max_prompt_images: 8
    assert r.status_code == 400 and "at most 8" in r.json()["error"]["message"]


def test_images_generations_and_models(client):
    r = client.post("/v1/images/generations", json={"prompt": "a red circle", "n": 2, "num_inference_steps": 2,
                                                     "seed": 3, "guidance_scale": 2.0})
    assert r.status_code == 200, r.text
    assert [d["seed"] for d in r.json()["data"]] == [3, 4] and r.json()["data"][0]["b64_json"]
    events = sse_events(client.post("/v1/images/generations", json={
        "prompt": "a", "num_inference_steps": 4, "stream": True, "partial_images": 1}))
    kinds = [e["type"] for e in events[:-1]]
    assert kinds == ["image_generation.partial_image", "image_generation.completed"] and events[-1] == "[DONE]"
    assert client.post("/v1/images/generations", json={"prompt": "a", "size": "1024x1024"}).status_code == 400
    models = client.get("/v1/models").json()
    assert models["data"][0]["id"] == "tiny" and models["object"] == "list"
