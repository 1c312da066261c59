"""A checkpoint served for real (`xfusion-serve serve` in a subprocess, its settings from XFUSION_* variables):
chat, a caption and an image through HTTP, chat's greedy text against transformers' in the same precision,
and the server's memory against what it holds by design (weights and KV pools, from its /metrics).

    XFUSION_DTYPE=bfloat16 python benchmarks/serve_check.py --checkpoint DIR [--tokens 16] [--steps 2]

Not a test: it prints what it saw (a 1B-class checkpoint takes minutes to load and to draw on the CPU).
"""

from __future__ import annotations

import argparse
import os
import time

import httpx
import torch
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer, LlamaForCausalLM

from xfusion_serve.demo.evaluate import live_server
from xfusion_serve.demo.shapes import sample as shape_sample
from xfusion_serve.model.config import XFusionConfig, resolve_component
from xfusion_serve.model.prompts import chat_prompt
from xfusion_serve.server.schemas import image_from_base64, image_to_base64

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def transformers_answer(checkpoint: str, dtype: str, tokens: int) -> str:
    text_dir = resolve_component(checkpoint, XFusionConfig.load(checkpoint).text_tower, "text tower")
    tok = AutoTokenizer.from_pretrained(text_dir)
    hf = LlamaForCausalLM.from_pretrained(text_dir, dtype=getattr(torch, dtype)).eval()
    ids = chat_prompt(tok, QUESTION)
    out = hf.generate(torch.tensor([ids]), max_new_tokens=tokens, do_sample=False)[0, len(ids):].tolist()
    stops = set(hf.generation_config.eos_token_id if isinstance(hf.generation_config.eos_token_id, list)
                else [hf.generation_config.eos_token_id])
    out = out[: next((i for i, t in enumerate(out) if t in stops), len(out))]
    return tok.decode(out, skip_special_tokens=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--steps", type=int, default=2)
    args = p.parse_args()
    dtype = os.environ.get("XFUSION_DTYPE", "float32")
    start = time.perf_counter()
    with live_server(args.checkpoint, timeout=1800) as url, httpx.Client(base_url=url, timeout=1800) as h:
        print(f"{args.checkpoint} in {dtype}: ready in {time.perf_counter() - start:.0f} s")
        t = time.perf_counter()
        chat = h.post("/v1/chat", json={"messages": QUESTION, "max_tokens": args.tokens}).json()
        said = chat["choices"][0]["message"]["content"]
        print(f"chat: {args.tokens} tokens at most in {time.perf_counter() - t:.1f} s: {said!r}")
        t = time.perf_counter()
        picture = shape_sample(0, 0)[1].resize((256, 256))
        caption = h.post("/v1/caption", json={"image": image_to_base64(picture), "max_tokens": 8}).json()
        print(f"caption: in {time.perf_counter() - t:.1f} s: {caption['caption']!r}")
        t = time.perf_counter()
        drawn = h.post("/v1/generate-image", json={"prompt": "a red circle", "steps": args.steps, "seed": 0}).json()
        image = image_from_base64(drawn["data"][0]["b64_json"])
        print(f"image: {image.size[0]}x{image.size[1]}, {args.steps} steps in {time.perf_counter() - t:.1f} s")
        metrics = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for fam in text_string_to_metric_families(h.get("/metrics").text) for s in fam.samples}
    gib = {k[0] + "".join(f"{{{v}}}" for _, v in k[1]): v / 2**30 for k, v in metrics.items()
           if k[0] in ("process_resident_memory_bytes", "xfusion_model_weight_bytes",
                       "xfusion_kv_cache_capacity_bytes")}
    held = sum(v for k, v in gib.items() if not k.startswith("process"))
    print("memory (GiB): " + ", ".join(f"{k} {v:.2f}" for k, v in gib.items())
          + f"; RSS over weights + KV pools: {gib['process_resident_memory_bytes'] - held:+.2f}")
    want = transformers_answer(args.checkpoint, dtype, args.tokens)
    print(f"chat's greedy text is transformers' ({dtype}): {said == want}" + ("" if said == want else f" ({want!r})"))


if __name__ == "__main__":
    main()
