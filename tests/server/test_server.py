"""The HTTP service on a tiny checkpoint: the three endpoints, streaming, probes and clear errors."""

from __future__ import annotations

import base64
import io
import json

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from transformers import LlamaForCausalLM

from xfusion_serve import Engine, EngineConfig, load_checkpoint
from xfusion_serve.demo.shapes import sample as shape_sample
from xfusion_serve.model.prompts import chat_prompt
from xfusion_serve.server.app import create_app
from xfusion_serve.server.schemas import image_to_base64
from xfusion_serve.server.state import ServerConfig


@pytest.fixture
def client(random_checkpoint_dir):
    engine = Engine(load_checkpoint(random_checkpoint_dir), EngineConfig(block_size=4))
    app = create_app(ServerConfig(checkpoint=str(random_checkpoint_dir)), engine=engine)
    with TestClient(app) as c:
        c.engine = engine
        yield c


def sse_events(response) -> list:
    out = []
    for line in response.text.splitlines():
        if line.startswith("data: "):
            payload = line[len("data: "):]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def fail_decode_call(monkeypatch, runner, n: int, message: str) -> dict:
    """The runner's n-th decode call raises; -> the call counter {"n": calls so far}."""
    real, calls = runner.decode, {"n": 0}

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == n:
            raise RuntimeError(message)
        return real(*a, **k)

    monkeypatch.setattr(runner, "decode", failing)
    return calls


def test_probes(client):
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").status_code == 200


def test_chat_matches_the_engine_and_streams_the_same_text(client):
    body = {"messages": [{"role": "user", "content": "a small red circle"}], "max_tokens": 12}
    r = client.post("/v1/chat", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    engine = client.engine
    tok = engine.tokenizer
    assert out["choices"][0]["message"]["role"] == "assistant"
    assert out["choices"][0]["finish_reason"] in ("stop", "length")
    assert out["usage"]["completion_tokens"] >= 1
    # Greedy through HTTP is the frozen LLM's own greedy answer, stopped at its eos ids.
    ids = chat_prompt(tok, body["messages"])
    hf = LlamaForCausalLM.from_pretrained(engine.ckpt.text_tower_dir, dtype=torch.float32).eval()
    gen = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, pad_token_id=1)[0, len(ids):].tolist()
    gen = gen[: next((i for i, t in enumerate(gen) if t in engine.ckpt.eos_token_ids), len(gen))]
    assert out["choices"][0]["message"]["content"] == tok.decode(gen, skip_special_tokens=True)
    assert out["usage"] == {"prompt_tokens": len(ids), "completion_tokens": len(gen),
                            "total_tokens": len(ids) + len(gen)}

    streamed = client.post("/v1/chat", json=body | {"stream": True})
    events = sse_events(streamed)
    assert events[-1] == "[DONE]"
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert text == out["choices"][0]["message"]["content"]
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert events[-2]["choices"][0]["finish_reason"] == out["choices"][0]["finish_reason"]


def test_caption_accepts_base64_and_data_uri(client):
    image = shape_sample(3, 0)[1]
    b64 = image_to_base64(image)
    a = client.post("/v1/caption", json={"image": b64, "max_tokens": 6})
    b = client.post("/v1/caption", json={"image": "data:image/png;base64," + b64, "max_tokens": 6})
    assert a.status_code == 200, a.text
    assert a.json()["caption"] == b.json()["caption"]
    assert a.json()["object"] == "caption"


def test_generate_image_returns_pngs_with_their_seeds(client):
    r = client.post("/v1/generate-image", json={"prompt": "a red circle", "n": 2, "steps": 2, "seed": 5})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert [d["seed"] for d in data] == [5, 6]
    images = [Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))) for d in data]
    assert all(im.format == "PNG" and im.size == (16, 16) for im in images)
    again = client.post("/v1/generate-image", json={"prompt": "a red circle", "n": 1, "steps": 2, "seed": 5})
    assert again.json()["data"][0]["b64_json"] == data[0]["b64_json"]
    wide = client.post("/v1/generate-image", json={"prompt": "x", "size": "16x8", "steps": 1})
    assert wide.status_code == 200 and Image.open(io.BytesIO(base64.b64decode(
        wide.json()["data"][0]["b64_json"]))).size == (16, 8)

    streamed = sse_events(client.post("/v1/generate-image", json={"prompt": "a", "steps": 3, "stream": True}))
    assert [e["step"] for e in streamed if isinstance(e, dict) and e.get("type") == "step"] == [1, 2, 3]
    assert streamed[-2]["type"] == "completed" and streamed[-1] == "[DONE]"


@pytest.mark.parametrize("path, body, param, status", [
    ("/v1/generate-image", {"prompt": "a", "size": "32x32"}, "size", 400),  # well formed, not possible
    ("/v1/caption", {"image": "not base64!"}, "image", 400),
    ("/v1/caption", {"image": base64.b64encode(b"not an image").decode()}, "image", 400),
    ("/v1/generate-image", {"prompt": "a", "n": 9}, "n", 422),  # against the schema
    ("/v1/chat", {"messages": []}, "messages", 422),
    ("/v1/chat", {"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role", 422),
    ("/v1/chat", {"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, "temperature", 422),
])
def test_bad_requests_get_openai_error_bodies(client, path, body, param, status):
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and err["type"] == "invalid_request_error"


def test_an_image_too_large_is_refused_before_decoding(client):
    buf = io.BytesIO()
    Image.new("1", (5000, 5000)).save(buf, format="PNG")  # small file, 25 megapixels
    r = client.post("/v1/caption", json={"image": base64.b64encode(buf.getvalue()).decode()})
    assert r.status_code == 400 and "limit" in r.json()["error"]["message"]


def test_a_prompt_longer_than_the_model_is_a_client_error(client):
    r = client.post("/v1/chat", json={"messages": [{"role": "user", "content": "a " * 300}]})
    assert r.status_code == 400 and "does not fit" in r.json()["error"]["message"]


def test_a_failing_step_fails_its_requests_and_the_server_goes_on(client, monkeypatch):
    runner = client.engine.runner
    fail_decode_call(monkeypatch, runner, 1, "boom")
    body = {"messages": [{"role": "user", "content": "a red circle"}], "max_tokens": 6, "ignore_eos": True}
    r = client.post("/v1/chat", json=body)
    assert r.status_code == 500 and "boom" in r.json()["error"]["message"]
    assert client.post("/v1/chat", json=body).status_code == 200
    assert client.get("/ready").status_code == 200
    pools = runner.pools["text"].blocks
    assert pools.num_free == pools.num_blocks


def test_api_keys_request_ids_and_body_limit(random_checkpoint_dir):
    engine = Engine(load_checkpoint(random_checkpoint_dir), EngineConfig(block_size=4))
    config = ServerConfig(api_keys=["k1", "k2", " "], max_body_bytes=4096)  # a blank key is no key
    with TestClient(create_app(config, engine=engine)) as c:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        assert c.post("/v1/chat", json=body).status_code == 401
        assert c.post("/v1/chat", json=body, headers={"Authorization": "Bearer  "}).status_code == 401
        wrong = c.post("/v1/chat", json=body, headers={"Authorization": "Bearer k3"})
        assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
        for key in ("k1", "k2"):
            assert c.post("/v1/chat", json=body, headers={"Authorization": f"Bearer {key}"}).status_code == 200
        assert c.get("/health").status_code == 200 and c.get("/ready").status_code == 200  # probes stay open
        r = c.post("/v1/chat", json=body, headers={"Authorization": "Bearer k1", "X-Request-Id": "abc-123"})
        assert r.headers["X-Request-Id"] == "abc-123"
        assert len(c.get("/health").headers["X-Request-Id"]) == 32
        refused = c.post("/v1/chat", json=body, headers={"X-Request-Id": "r-1"})  # refused requests keep theirs
        assert refused.status_code == 401 and refused.headers["X-Request-Id"] == "r-1"
        with c.stream("POST", "/v1/chat/completions", json={**body, "stream": True},
                      headers={"Authorization": "Bearer k2", "X-Request-Id": "s-1"}) as streamed:
            assert streamed.headers["X-Request-Id"] == "s-1" and "[DONE]" in "".join(streamed.iter_text())
        big = c.post("/v1/caption", json={"image": "A" * 8000}, headers={"Authorization": "Bearer k1"})
        assert big.status_code == 413 and "error" in big.json()
        chunked = c.post("/v1/chat", content=iter([b"{}"]), headers={"Authorization": "Bearer k1"})
        assert chunked.status_code == 411


def test_gauges_are_the_engines_state_when_scraped(checkpoint_dir):
    """Gauges are read from the scheduler at the scrape (render_metrics), not left from the last step: requests
    added and not yet stepped show as waiting, stepped ones as running with their KV blocks in use, and none once
    they have ended, with no step run between the scrape and the change."""
    from prometheus_client.parser import text_string_to_metric_families
    from test_engine import make_engine

    from xfusion_serve import SamplingParams
    from xfusion_serve.server.metrics import Metrics, render_metrics

    engine, metrics = make_engine(checkpoint_dir, max_running=2), Metrics()

    def scrape() -> dict:
        text = render_metrics(engine, metrics).decode()
        return {(s.name, tuple(s.labels.values())): s.value for fam in text_string_to_metric_families(text)
                for s in fam.samples}

    ids = [engine.add_text([5, 6, 7, 8, 9], SamplingParams(max_tokens=20, ignore_eos=True)) for _ in range(3)]
    now = scrape()
    assert (now[("xfusion_num_requests_waiting", ("text",))], now[("xfusion_num_requests_running", ("text",))]) == (
        3, 0)
    assert now[("xfusion_kv_cache_usage_perc", ("text",))] == 0
    engine.step()  # two admitted (max_running), one waits
    now = scrape()
    assert (now[("xfusion_num_requests_waiting", ("text",))], now[("xfusion_num_requests_running", ("text",))]) == (
        1, 2)
    assert now[("xfusion_kv_cache_usage_perc", ("text",))] > 0
    for rid in ids:
        engine.cancel(rid)
    now = scrape()
    assert (now[("xfusion_num_requests_waiting", ("text",))], now[("xfusion_num_requests_running", ("text",))]) == (
        0, 0)
    assert now[("xfusion_kv_cache_usage_perc", ("text",))] == 0


def test_a_scrape_as_the_engine_fails_answers_what_this_process_has(client, monkeypatch):
    """An engine that fails between /metrics' check that it is alive and its call: the scrape answers this
    process's metrics (as after a failure), not a server error."""
    from xfusion_serve.engine.streams import EngineFailed

    async def failing(fn):
        raise EngineFailed("planted")

    monkeypatch.setattr(client.app.state.server.engine, "call", failing)
    r = client.get("/metrics")
    assert r.status_code == 200 and b"xfusion_generation_tokens_total" in r.content


def test_metrics_parse_and_move(client):
    from prometheus_client.parser import text_string_to_metric_families

    def scrape() -> dict:
        text = client.get("/metrics").text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(text) for s in fam.samples}

    before = scrape()
    client.post("/v1/chat", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                                  "ignore_eos": True})
    client.post("/v1/generate-image", json={"prompt": "a", "steps": 2})
    after = scrape()

    def moved(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert moved("xfusion_generation_tokens_total", task="text") == 3
    assert moved("xfusion_request_success_total", task="text", finished_reason="length") == 1
    assert moved("xfusion_images_total") == 1 and moved("xfusion_denoising_steps_total") == 2
    assert moved("xfusion_time_to_first_token_seconds_count", task="text") == 1
    assert moved("xfusion_inter_token_latency_seconds_count", task="text") == 2
    assert moved("xfusion_image_generation_seconds_count") == 1
    assert ("xfusion_kv_cache_usage_perc", (("tower", "text"),)) in after
    engine = client.app.state.server.engine.engine
    for tower, pool in engine.runner.pools.items():
        assert after[("xfusion_kv_cache_capacity_bytes", (("tower", tower),))] == pool.kv.numel() * 4  # float32
    params = list(engine.ckpt.model.parameters()) + list(engine.ckpt.vae.parameters())
    assert after[("xfusion_model_weight_bytes", ())] == 4 * sum(p.numel() for p in params)
    assert after[("xfusion_num_requests_running", (("task", "image"),))] == 0
    assert after[("process_resident_memory_bytes", ())] > 10 << 20  # the load generator reads memory here


def test_caption_as_a_multipart_upload(client):
    image = shape_sample(3, 0)[1]
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    up = client.post("/v1/caption", files={"image": ("x.png", buf.getvalue(), "image/png")},
                     data={"max_tokens": "6"})
    assert up.status_code == 200, up.text
    js = client.post("/v1/caption", json={"image": image_to_base64(image), "max_tokens": 6})
    assert up.json()["caption"] == js.json()["caption"]
    assert client.post("/v1/caption", data={"max_tokens": "6"}, files={"other": ("x", b"1")}).status_code == 422
    zero = client.post("/v1/caption", json={"image": image_to_base64(image), "max_tokens": 0})
    assert zero.status_code == 422 and zero.json()["error"]["param"] == "max_tokens"


def test_queue_full_and_not_ready_answer_with_retry_after(client):
    server = client.app.state.server
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    limit = server.config.max_queue
    server.config.max_queue = 0
    try:
        r = client.post("/v1/chat", json=body)
        assert r.status_code == 429 and r.headers["Retry-After"] and r.json()["error"]["type"] == "rate_limit_exceeded"
    finally:
        server.config.max_queue = limit
    server.ready = False  # loading, or draining after SIGTERM
    try:
        r = client.post("/v1/chat", json=body)
        assert r.status_code == 503 and r.headers["Retry-After"]
        assert client.get("/ready").status_code == 503 and client.get("/health").status_code == 200
    finally:
        server.ready = True
    assert client.post("/v1/chat", json=body).status_code == 200


def test_streams_send_previews_and_end_failures_with_an_error_event(client, monkeypatch):
    events = sse_events(client.post("/v1/generate-image", json={"prompt": "a", "steps": 2, "stream": True,
                                                               "preview_every": 1}))
    previews = [e["images"] for e in events if isinstance(e, dict) and e.get("type") == "step"]
    assert len(previews) == 2 and Image.open(io.BytesIO(base64.b64decode(previews[0][0]))).format == "PNG"

    calls = fail_decode_call(monkeypatch, client.engine.runner, 3, "boom mid-stream")
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10, "ignore_eos": True, "stream": True}
    events = sse_events(client.post("/v1/chat", json=body))
    assert events[-1] == "[DONE]" and "boom mid-stream" in events[-2]["error"]["message"]
    assert calls["n"] == 3  # it failed mid-way, after two decode steps had streamed


@pytest.mark.parametrize("auth, status", [
    ("Bearer secret-key", 200), ("bearer secret-key", 200),
    ("Bearer secret", 401), ("Bearer secret-key-and-more", 401), ("Bearer secret-ke", 401),
    ("Bearer SECRET-KEY", 401), ("Bearer other", 200), ("secret-key", 401), ("Bearer ", 401), (None, 401),
])
def test_api_keys_match_whole(auth, status):
    """A key that is a prefix or an extension of a real one is a wrong key; either of two keys is right."""
    client = TestClient(create_app(ServerConfig(api_keys=["secret-key", "other"])))  # no lifespan: no model
    r = client.get("/v1/models", headers={"Authorization": auth} if auth else {})
    assert r.status_code == status, r.text
