"""Every inference route answers the same with the engine in a process of its own (the default of `serve`) as
with the engine on a thread of the server: each route's request crosses the pipe (it must pickle), its
events come back, previews are decoded in the API process, and /metrics carries both processes."""

from __future__ import annotations

import base64
import io
import json
import time

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from test_engine import make_engine

from xfusion_serve import EngineConfig
from xfusion_serve.server.app import create_app
from xfusion_serve.server.state import ServerConfig


def png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(buf, format="PNG")
    return buf.getvalue()


URI = "data:image/png;base64," + base64.b64encode(png((200, 40, 40))).decode()
PICTURE_QUESTION = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": URI}},
                                                  {"type": "text", "text": "what is it"}]}]
JSON_ROUTES = [
    # n choices reach either engine as one message, added before the same step (another batching would be
    # other float rounding), and share their pictures
    ("/v1/completions", {"prompt": "a red", "max_tokens": 8, "logprobs": 2, "ignore_eos": True, "seed": 11,
                         "n": 3}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 8,
                              "ignore_eos": True, "temperature": 0}),
    ("/v1/chat/completions", {"messages": PICTURE_QUESTION, "max_tokens": 6, "ignore_eos": True, "seed": 2,
                              "n": 2}),
    ("/v1/chat/completions", {"messages": PICTURE_QUESTION, "modalities": ["image"], "num_inference_steps": 2,
                              "seed": 5}),
    ("/v1/chat", {"messages": PICTURE_QUESTION, "modalities": ["text", "image"], "max_tokens": 4, "steps": 2,
                  "seed": 3, "temperature": 0}),
    ("/v1/caption", {"image": base64.b64encode(png((20, 20, 200))).decode(), "max_tokens": 6, "temperature": 0}),
    ("/v1/generate-image", {"prompt": "a red circle", "steps": 2, "seed": 7, "n": 2}),
    ("/v1/images/generations", {"prompt": "a blue square", "num_inference_steps": 2, "seed": 9}),
]
STREAMS = [
    ("/v1/completions", {"prompt": "a red", "max_tokens": 8, "ignore_eos": True, "stream": True, "temperature": 0}),
    ("/v1/generate-image", {"prompt": "a red circle", "steps": 3, "seed": 7, "stream": True, "preview_every": 1}),
]


def comparable(body):
    """A response without what differs between any two calls (ids, timestamps)."""
    if isinstance(body, dict):
        return {k: comparable(v) for k, v in body.items() if k not in ("id", "created")}
    if isinstance(body, list):
        return [comparable(v) for v in body]
    return body


def answers(client: TestClient) -> list:
    out = []
    for route, body in JSON_ROUTES:
        r = client.post(route, json=body)
        assert r.status_code == 200, (route, r.text)
        out.append(comparable(r.json()))
    r = client.post("/v1/images/edits", files=[("image", ("a.png", png((30, 160, 30)), "image/png"))],
                    data={"prompt": "make it blue", "num_inference_steps": "2", "seed": "4"})
    assert r.status_code == 200, r.text
    out.append(comparable(r.json()))
    for route, body in STREAMS:
        lines = [line[6:] for line in client.post(route, json=body).text.splitlines() if line.startswith("data: ")]
        assert lines[-1] == "[DONE]"
        events = [comparable(json.loads(line)) for line in lines[:-1]]
        if route == "/v1/completions":  # tokens may come joined when the client is behind: compare the text
            events = ["".join(e["choices"][0]["text"] for e in events), events[-1]["choices"][0]["finish_reason"]]
        out.append(events)
    return out


@pytest.fixture
def both(random_checkpoint_dir):
    threaded = create_app(ServerConfig(served_model_name="tiny"), engine=make_engine(random_checkpoint_dir))
    process = create_app(ServerConfig(checkpoint=str(random_checkpoint_dir), served_model_name="tiny",
                                      engine=EngineConfig(block_size=4)))
    with TestClient(threaded) as t, TestClient(process) as p:
        yield t, p


def test_every_route_answers_the_same_from_the_engine_process(both):
    threaded, process = both
    assert process.app.state.server.engine.__class__.__name__ == "EngineProcess"
    expected, got = answers(threaded), answers(process)
    assert len(got) == len(JSON_ROUTES) + 1 + len(STREAMS)
    for (route, _), a, b in zip(JSON_ROUTES + [("/v1/images/edits", None)] + STREAMS, expected, got):
        assert a == b, route
    previews = [e for e in got[-1] if e.get("images")]
    assert len(previews) == 3, "one preview a step, decoded in the API process"


def test_metrics_count_the_engine_process_work_and_both_processes_memory(both):
    _, process = both
    route, body = JSON_ROUTES[0]
    assert process.post(route, json=body).status_code == 200
    text = process.get("/metrics").text
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert values['xfusion_generation_tokens_total{task="text"}'] >= 8  # 8 tokens asked, end of text ignored
    assert values["process_resident_memory_bytes"] > 0  # the engine process's
    assert values["xfusion_api_server_process_resident_memory_bytes"] > 0
    assert process.get("/health").json() == {"status": "ok"} and process.get("/ready").status_code == 200


def test_a_dead_engine_process_fails_health_and_ready_and_requests_get_503(both):
    import os
    import signal

    _, process = both
    engine = process.app.state.server.engine
    os.kill(engine._proc.pid, signal.SIGKILL)
    for _ in range(200):  # the reader thread sees the process end (and reaps it: no join here to race with)
        if engine.failure:
            break
        time.sleep(0.05)
    health = process.get("/health")
    assert health.status_code == 503 and "exit code -9" in health.json()["error"]
    assert process.get("/ready").status_code == 503
    route, body = JSON_ROUTES[1]
    assert process.post(route, json=body).status_code == 503


def test_a_stop_string_answers_as_on_a_thread_and_counts_as_a_stop_in_the_engine_process_metrics(both):
    """The engine process's text is made in the API process: a stop string cuts the answer there (streamed or
    not) as the threaded engine cuts it, and the engine process's metrics count the request finished "stop"."""
    threaded, process = both
    body = {"prompt": "a red", "max_tokens": 16, "ignore_eos": True, "temperature": 0}
    full = threaded.post("/v1/completions", json=body).json()["choices"][0]["text"]
    stop = next(full[i : i + 2] for i in range(3, len(full) - 2) if full.find(full[i : i + 2]) == i)
    body = {**body, "max_tokens": 200, "stop": [stop]}

    def stop_count() -> float:
        for line in process.get("/metrics").text.splitlines():
            if line.startswith('xfusion_request_success_total{finished_reason="stop",task="text"}'):
                return float(line.split(" ")[1])
        return 0.0

    before = stop_count()
    for client in (threaded, process):
        answer = client.post("/v1/completions", json=body).json()
        assert (answer["choices"][0]["text"], answer["choices"][0]["finish_reason"]) == (full[: full.find(stop)],
                                                                                        "stop")
        streamed = client.post("/v1/completions", json={**body, "stream": True}).text
        chunks = [json.loads(line[6:]) for line in streamed.splitlines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
        assert "".join(c["choices"][0]["text"] for c in chunks) == full[: full.find(stop)]
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    for _ in range(50):  # the second request's finish is counted once the engine process has handled it
        if stop_count() == before + 2:
            break
        time.sleep(0.05)
    assert stop_count() == before + 2
