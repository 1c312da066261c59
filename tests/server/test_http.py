"""Through real HTTP: uvicorn on a free local port, httpx and the official `openai` client."""

from __future__ import annotations

import base64
import threading
import time

import httpx
import pytest
from conftest import free_port, run_live

from xfusion_serve.server.state import ServerConfig


@pytest.fixture
def live(random_checkpoint_dir):
    config = ServerConfig(served_model_name="tiny", allowed_image_domains=["localhost"])
    server, thread, url, engine, _ = run_live(random_checkpoint_dir, config)
    yield url, engine
    server.should_exit = True
    thread.join(10)


def test_the_official_openai_client_works_unchanged(live):
    openai = pytest.importorskip("openai")
    url, engine = live
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=5, temperature=0)
    assert chat.choices[0].finish_reason in ("stop", "length") and chat.usage.prompt_tokens > 0
    streamed = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=5, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == chat.choices[0].message.content
    completion = client.completions.create(model="tiny", prompt="a red", max_tokens=4, temperature=0)
    assert completion.choices[0].finish_reason in ("stop", "length")
    images = client.images.generate(model="tiny", prompt="a red circle", n=2,
                                    extra_body={"num_inference_steps": 2, "seed": 7})
    assert len(images.data) == 2 and base64.b64decode(images.data[0].b64_json)[:4] == b"\x89PNG"
    assert [m.id for m in client.models.list()] == ["tiny"]


def test_a_client_that_disconnects_frees_its_request(live):
    url, engine = live
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", url + "/v1/chat", json=body, timeout=30) as r:
        lines = r.iter_lines()
        while not next(lines).startswith("data: "):
            pass
    # Gone after two events: the server notices, cancels the request and frees its blocks.
    pool = engine.runner.pools["text"].blocks
    for _ in range(200):
        if not engine.requests and pool.num_free == pool.num_blocks:
            break
        time.sleep(0.05)
    assert not engine.requests and pool.num_free == pool.num_blocks


def test_a_failing_request_beside_healthy_ones(live):
    url, engine = live
    results = {}

    def call(name, body, path="/v1/chat"):
        results[name] = httpx.post(url + path, json=body, timeout=60)

    healthy = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 20, "ignore_eos": True}
    threads = [threading.Thread(target=call, args=(f"ok{i}", healthy)) for i in range(3)]
    threads.append(threading.Thread(target=call, args=("bad", {"image": "AAAA"}, "/v1/caption")))
    threads.append(threading.Thread(target=call, args=("long", {"messages": [{"role": "user", "content": "a " * 400}]})))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(results[f"ok{i}"].status_code == 200 for i in range(3))
    assert results["bad"].status_code == 400 and results["long"].status_code == 400
    assert {results[f"ok{i}"].json()["choices"][0]["message"]["content"] for i in range(3)}.__len__() == 1


def test_image_urls_only_from_allowed_domains(live, tmp_path):
    import functools
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    from xfusion_serve.demo.shapes import sample as shape_sample
    from xfusion_serve.server.schemas import image_to_base64

    image = shape_sample(9, 0)[1]
    image.save(tmp_path / "shape.png")
    files = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(SimpleHTTPRequestHandler, directory=tmp_path))
    threading.Thread(target=files.serve_forever, daemon=True).start()
    url, _ = live
    try:
        def ask(image_url):
            parts = [{"type": "image_url", "image_url": {"url": image_url}}]
            return httpx.post(url + "/v1/chat/completions", json={
                "messages": [{"role": "user", "content": parts}], "max_tokens": 5, "temperature": 0}, timeout=30)

        port = files.server_address[1]
        fetched = ask(f"http://localhost:{port}/shape.png")
        assert fetched.status_code == 200, fetched.text
        inline = ask("data:image/png;base64," + image_to_base64(image))
        assert fetched.json()["choices"][0]["message"]["content"] == inline.json()["choices"][0]["message"]["content"]
        refused = ask(f"http://127.0.0.1:{port}/shape.png")  # same file, a host not on the list
        assert refused.status_code == 400 and "not allowed" in refused.json()["error"]["message"]
        assert ask(f"http://localhost:{port}/missing.png").status_code == 400
    finally:
        files.shutdown()


def test_sigterm_drains_running_requests_then_exits(random_checkpoint_dir):
    import os
    import signal
    import subprocess
    import sys

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "xfusion_serve.cli", "serve", "--checkpoint",
                             str(random_checkpoint_dir), "--port", str(port), "--drain-timeout", "20",
                             "--block-size", "4"], env=os.environ | {"OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/ready").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        results = {}
        slow = {"prompt": "a red circle", "steps": 200, "n": 8}  # seconds of work together, even on this model
        workers = [threading.Thread(target=lambda i=i: results.setdefault(i, httpx.post(
            url + "/v1/generate-image", json=slow | {"seed": i}, timeout=120))) for i in range(4)]
        for w in workers:
            w.start()
        time.sleep(0.5)  # they are running
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.1)
        late = httpx.post(url + "/v1/chat", json={"messages": [{"role": "user", "content": "hi"}]}, timeout=10)
        assert late.status_code == 503 and late.headers["retry-after"]  # new ones are refused while it drains
        assert httpx.get(url + "/ready").status_code == 503
        for w in workers:
            w.join(120)
        assert [results[i].status_code for i in range(4)] == [200] * 4  # finished, not cut off
        assert all(len(results[i].json()["data"]) == 8 for i in range(4))
        assert proc.wait(30) == 0
        with pytest.raises(httpx.HTTPError):  # and nothing is served any more
            httpx.get(url + "/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_non_streaming_client_that_leaves_is_cancelled(live):
    url, engine = live
    body = {"prompt": "a red circle", "negative_prompt": "blue", "n": 8, "steps": 200}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/generate-image", json=body, timeout=0.3)
    pool = engine.runner.pools["vision"].blocks
    for _ in range(200):
        pinned = sum(len(engine.scheduler.prompt_cache[k]["vision"]) for k in engine.scheduler.pinned)
        if not engine.requests and pool.num_free + pinned == pool.num_blocks:
            break
        time.sleep(0.05)
    assert not engine.requests and pool.num_free + pinned == pool.num_blocks
    metrics = httpx.get(url + "/metrics").text
    assert 'xfusion_request_success_total{finished_reason="abort",task="image"} 1.0' in metrics


def test_every_endpoint_and_error_code_over_real_http(random_checkpoint_dir):
    from xfusion_serve.demo.shapes import sample as shape_sample
    from xfusion_serve.server.schemas import image_to_base64

    config = ServerConfig(served_model_name="tiny", api_keys=["key"], max_body_bytes=100_000)
    server, thread, url, engine, app = run_live(random_checkpoint_dir, config)
    auth = {"Authorization": "Bearer key"}
    png = image_to_base64(shape_sample(1, 1)[1])
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    try:
        with httpx.Client(base_url=url, headers=auth, timeout=60) as c:
            assert c.get("/health").status_code == 200 and c.get("/ready").status_code == 200
            assert "xfusion_num_requests_running" in c.get("/metrics").text
            assert c.post("/v1/chat", json=chat).status_code == 200
            assert sse_lines(c, "/v1/chat", chat | {"stream": True})[-1] == "[DONE]"
            assert c.post("/v1/caption", json={"image": png, "max_tokens": 3}).status_code == 200
            assert c.post("/v1/caption", files={"image": ("a.png", base64.b64decode(png), "image/png")}).status_code == 200
            assert c.post("/v1/generate-image", json={"prompt": "a", "steps": 2}).status_code == 200
            assert sse_lines(c, "/v1/generate-image", {"prompt": "a", "steps": 2, "stream": True})[-1] == "[DONE]"
            assert c.post("/v1/chat/completions", json=chat).status_code == 200
            assert c.post("/v1/completions", json={"prompt": "a", "max_tokens": 2}).status_code == 200
            assert c.post("/v1/images/generations", json={"prompt": "a", "num_inference_steps": 2}).status_code == 200
            assert c.get("/v1/models").json()["data"][0]["id"] == "tiny"

            def status(path, body=None, headers=None, **kw):
                r = c.post(path, json=body, headers=headers, **kw)
                assert "error" in r.json(), r.text
                return r.status_code, r.headers

            assert status("/v1/chat", chat, {"Authorization": "Bearer nope"})[0] == 401
            assert status("/v1/caption", {"image": "A" * 200_000})[0] == 413
            assert status("/v1/chat", {"messages": "hi"})[0] == 422
            assert status("/v1/chat", {"messages": [{"role": "user", "content": "a " * 400}]})[0] == 400
            assert status("/v1/generate-image", {"prompt": "a", "size": "64x64"})[0] == 400
            assert status("/v1/caption", {"image": png[: len(png) // 2]})[0] == 400  # a truncated PNG
            state = app.state.server
            state.config.max_queue = 0
            code, headers = status("/v1/chat", chat)
            assert code == 429 and headers["retry-after"]
            state.config.max_queue, state.ready = 256, False
            code, headers = status("/v1/chat", chat)
            assert code == 503 and headers["retry-after"]
            state.ready = True
            assert c.post("/v1/chat", json=chat).status_code == 200
    finally:
        server.should_exit = True
        thread.join(10)


def sse_lines(client: httpx.Client, path: str, body: dict) -> list[str]:
    with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        return [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
