"""The embedded default checkpoint, through the HTTP service: its manifest holds, chat is the frozen LLM's,
and a handful of fresh samples caption and draw well above chance (a broken cache or sampler fails here)."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from conftest import free_port
from fastapi.testclient import TestClient
from PIL import Image
from transformers import LlamaForCausalLM

from xfusion_serve import EMBEDDED_CHECKPOINT
from xfusion_serve.demo.evaluate import caption_accuracy, generation_accuracy
from xfusion_serve.demo.recipe import MANIFEST, sha256_files
from xfusion_serve.model.prompts import chat_prompt
from xfusion_serve.server.app import create_app
from xfusion_serve.server.schemas import image_to_base64
from xfusion_serve.server.state import ServerConfig


@pytest.fixture(scope="module")
def client():
    with TestClient(create_app(ServerConfig())) as c:
        yield c


def test_manifest_matches_the_files():
    manifest = json.loads((EMBEDDED_CHECKPOINT / MANIFEST).read_text())
    assert manifest["sha256"] == sha256_files(EMBEDDED_CHECKPOINT)
    assert sum(p.stat().st_size for p in EMBEDDED_CHECKPOINT.rglob("*") if p.is_file()) < 50 << 20


def test_chat_is_the_frozen_llm(client):
    tok = client.app.state.server.tokenizer
    hf = LlamaForCausalLM.from_pretrained(EMBEDDED_CHECKPOINT / "text_tower", dtype=torch.float32).eval()
    eos = hf.generation_config.eos_token_id
    for question in ("What shapes are there?", "Hello", "Is a circle a shape?"):
        messages = [{"role": "user", "content": question}]
        ids = chat_prompt(tok, messages)
        gen = hf.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False)[0, len(ids):].tolist()
        gen = gen[: next((i for i, t in enumerate(gen) if t in eos), len(gen))]
        answer = client.post("/v1/chat", json={"messages": messages, "max_tokens": 40}).json()
        assert answer["choices"][0]["message"]["content"] == tok.decode(gen, skip_special_tokens=True)


def _caption(client):
    def caption(images):
        return [client.post("/v1/caption", json={"image": image_to_base64(im)}).json()["caption"] for im in images]
    return caption


def _generate(client):
    def generate(prompts, seeds):
        out = []
        for p, s in zip(prompts, seeds):
            data = client.post("/v1/generate-image", json={"prompt": p, "seed": s}).json()["data"]
            out.append(Image.open(io.BytesIO(base64.b64decode(data[0]["b64_json"]))))
        return out
    return generate


def test_a_handful_of_samples_are_well_above_chance(client):
    cap = caption_accuracy(_caption(client), 24)
    gen = generation_accuracy(_generate(client), 12)
    # Chance: color 1/8, shape 1/3, size 1/2, position 1/9.
    print(cap, gen)
    assert cap["color"] >= 0.75 and cap["shape"] >= 0.75 and cap["size"] >= 0.8 and cap["position"] >= 0.6, cap
    assert gen["color"] >= 0.6 and gen["shape"] >= 0.5 and gen["size"] >= 0.8 and gen["position"] >= 0.5, gen


@pytest.mark.slow
def test_full_eval_through_a_live_server_meets_the_targets():
    """The figures of the README: 300 fresh captions and 300 fresh images through `xfusion-serve serve`."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "xfusion_serve.cli", "serve", "--port", str(port)],
                              env=os.environ | {"OMP_NUM_THREADS": "2"})
    try:
        import httpx

        for _ in range(300):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        out = subprocess.run([sys.executable, "-m", "xfusion_serve.cli", "eval", "--base-url",
                              f"http://127.0.0.1:{port}", "--captions", "300", "--images", "300"],
                             capture_output=True, text=True, timeout=3000, check=True).stdout
        print(out)
        figures = {line.split()[0]: dict(zip(line.split()[1::2], (float(x.rstrip("%")) / 100
                                                                 for x in line.split()[2::2])))
                   for line in out.splitlines() if line.startswith(("captioning", "generation"))}
        cap, gen = figures["captioning"], figures["generation"]
        assert cap["color"] >= 0.95 and cap["shape"] >= 0.95 and cap["size"] >= 0.9 and cap["position"] >= 0.9
        assert gen["color"] >= 0.9 and gen["shape"] >= 0.9 and gen["size"] >= 0.8 and gen["position"] >= 0.8
    finally:
        server.terminate()
        server.wait(30)
