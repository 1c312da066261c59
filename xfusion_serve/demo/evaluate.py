"""Per-attribute accuracy on the shapes world, read back with the spec's checker.

Captioning: fresh images -> captions -> the attribute words they name. Generation: fresh prompts -> images
-> the attributes the checker reads from pixels. The captioner and the generator are plain callables, so the
same figures come from the model in process or from a running server.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from ..engine.uncached import caption_greedy_uncached, sample_images_uncached
from ..model.checkpoint import Checkpoint
from ..model.latents import decode_latents, encode_images
from . import shapes

EVAL_SEED = 1_000_003  # never a training seed: every image and prompt here is fresh

CaptionFn = Callable[[list[Image.Image]], list[str]]
GenerateFn = Callable[[list[str], list[int]], list[Image.Image]]


def _accuracy(hits: list[dict[str, bool]]) -> dict[str, float]:
    return {a: sum(h[a] for h in hits) / max(1, len(hits)) for a in shapes.ATTRIBUTES}


def caption_accuracy(caption: CaptionFn, n: int, batch: int = 64, seed: int = EVAL_SEED) -> dict[str, float]:
    samples = [shapes.sample(seed, i) for i in range(n)]
    hits = []
    for start in range(0, n, batch):
        chunk = samples[start : start + batch]
        for (truth, _), text in zip(chunk, caption([im for _, im in chunk])):
            hits.append(shapes.score(truth, shapes.read_caption(text)))
    return _accuracy(hits)


def generation_accuracy(generate: GenerateFn, n: int, batch: int = 32, seed: int = EVAL_SEED + 1) -> dict[str, float]:
    targets = [shapes.sample(seed, i)[0] for i in range(n)]
    hits = []
    for start in range(0, n, batch):
        chunk = targets[start : start + batch]
        images = generate([t.caption for t in chunk], [seed + start + k for k in range(len(chunk))])
        hits += [shapes.score(t, shapes.read_image(im)) for t, im in zip(chunk, images)]
    return _accuracy(hits)


@dataclass
class InProcess:
    """The captioner and generator of a loaded checkpoint, without a server."""

    ckpt: Checkpoint
    instruction: str = ""
    max_new_tokens: int = 24
    steps: int | None = None
    guidance_scale: float | None = None

    def caption(self, images: list[Image.Image]) -> list[str]:
        h, w = self.ckpt.config.image_sizes[0]
        dev = self.ckpt.model.text.model.embed_tokens.weight.device
        latents = encode_images(self.ckpt.vae, images, h, w).to(dev, self.ckpt.model.vision.boi.dtype)
        ids = caption_greedy_uncached(self.ckpt.model, self.ckpt.tokenizer, latents, self.instruction,
                                      self.max_new_tokens, set(self.ckpt.eos_token_ids))
        return self.ckpt.tokenizer.batch_decode(ids, skip_special_tokens=True)

    def generate(self, prompt_texts: list[str], seeds: list[int]) -> list[Image.Image]:
        s = self.ckpt.config.sampler
        h, w = self.ckpt.config.image_sizes[0]
        latents = sample_images_uncached(
            self.ckpt.model, self.ckpt.tokenizer, prompt_texts, seeds, self.steps or s.steps,
            s.guidance_scale if self.guidance_scale is None else self.guidance_scale, s.shift, h, w,
        )
        return decode_latents(self.ckpt.vae, latents)


@dataclass
class OverHTTP:
    """The captioner and generator of a running server, many requests in flight so the engine batches them."""

    base_url: str
    concurrency: int = 16
    api_key: str | None = None
    timeout: float = 600.0

    def _post(self, path: str, body: dict) -> dict:
        import httpx

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        r = httpx.post(self.base_url.rstrip("/") + path, json=body, headers=headers, timeout=self.timeout)
        r.raise_for_status()
        return r.json()

    def _map(self, fn, items):
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(fn, items))

    def caption(self, images: list[Image.Image]) -> list[str]:
        from ..server.schemas import image_to_base64

        return self._map(lambda im: self._post("/v1/caption", {"image": image_to_base64(im)})["caption"], images)

    def generate(self, prompt_texts: list[str], seeds: list[int]) -> list[Image.Image]:
        from ..server.schemas import image_from_base64

        def one(args):
            prompt, seed = args
            data = self._post("/v1/generate-image", {"prompt": prompt, "seed": seed, "n": 1})["data"]
            return image_from_base64(data[0]["b64_json"])

        return self._map(one, list(zip(prompt_texts, seeds)))


@contextmanager
def live_server(checkpoint: str | Path | None = None, timeout: float = 300.0) -> Iterator[str]:
    """`xfusion-serve serve` on `checkpoint` (default: the embedded one) in a subprocess on a free local port.
    -> its base URL, once /ready answers; the server is stopped on exit. RuntimeError if it exits first or is
    not ready within `timeout` seconds."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "xfusion_serve.cli", "serve", "--port", str(port), "--no-access-log"]
    server = subprocess.Popen(cmd + (["--checkpoint", str(checkpoint)] if checkpoint else []),
                              env=os.environ | {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"the server exited with {server.returncode} before it was ready")
            try:
                if httpx.get(url + "/ready").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server was not ready in {timeout:.0f} s")
            time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(30)


def report(name: str, acc: dict[str, float]) -> str:
    return f"{name:<11}" + "  ".join(f"{a} {acc[a]:6.1%}" for a in shapes.ATTRIBUTES)


@torch.no_grad()
def evaluate_in_process(ckpt: Checkpoint, n_caption: int, n_generate: int, **kw) -> dict[str, dict[str, float]]:
    runner = InProcess(ckpt, **kw)
    return {"captioning": caption_accuracy(runner.caption, n_caption),
            "generation": generation_accuracy(runner.generate, n_generate)}
