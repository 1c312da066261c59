"""Engine throughput against its baselines, on the same weights in one run (not a test: it prints figures).

    python benchmarks/bench_engine.py [--checkpoint DIR] [--device cpu|cuda] [--dtype float32|bfloat16]
        [--tokens 64] [--steps 20] [--repeats 3] [--chat 1,16] [--images 1,8] [--baselines-up-to 16]
        [--compile-decode] [--compile-denoise] [--startup-only] [--only chat|images] [--profile] [--json F]

Every figure is the best of `--repeats` runs. `--profile` prints where one denoising step of 8 requests spends
its time (torch.profiler). A real model shape: benchmarks/make_checkpoint.py. `--json` writes every figure.

chat tok/s at each of --chat concurrent requests (the baselines up to --baselines-up-to):
    engine            continuous batching, paged KV cache; also its time to first token (one request) and
                      its decode step alone (from runs of 1 and of --tokens tokens), with the bytes a step
                      reads (weights + KV) per second: on CUDA as a fraction of the GPU's memory bandwidth
    transformers      `generate` on the text tower, one request after another
    static loop       a bare static-cache greedy decode loop of the same model (the floor)
    greedy text       the engine's tokens against `generate`'s, stop tokens included (identical in float32)
images/s at each of --images concurrent requests:
    engine            prompt K/V cached once, image tokens only per step, CFG rows batched
    naive             the whole sequence through both towers at every step, two CFG passes
memory: the process's peak RSS (and on CUDA the peak of GPU memory allocated) against the weights' bytes and
the KV budget.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from xfusion_serve import EMBEDDED_CHECKPOINT, Engine, EngineConfig, ImageSegment, SamplingParams
from xfusion_serve.engine.flow_matching import flow_sigmas, guided, initial_noise
from xfusion_serve.model import prompts
from xfusion_serve.model.latents import decode_latents
from xfusion_serve.model.reference import reference_forward

QUESTIONS = ["What shapes are there?", "Hello", "What colors are there?", "Is a circle a shape?"]


def timed(fn, repeats: int = 3) -> float:
    """Best of `repeats` wall times: the machine's noise only ever adds time."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def chat_ids(engine: Engine, n: int) -> list[list[int]]:
    return [engine.tokenizer.apply_chat_template([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                                                 add_generation_prompt=True, return_dict=False) for i in range(n)]


@torch.no_grad()
def static_loop(model, prompt: list[int], tokens: int) -> list[int]:
    """Greedy decoding with a preallocated [layers, 2, heads, T, d] cache written in place (gpt-fast's shape)."""
    text = model.text
    layers = text.model.layers
    attn0, dev = layers[0].self_attn, text.model.embed_tokens.weight.device
    cache = torch.zeros(len(layers), 2, attn0.kv_heads, len(prompt) + tokens, attn0.head_dim, device=dev,
                        dtype=text.model.embed_tokens.weight.dtype)
    ids, out = torch.tensor(prompt, device=dev), []
    pos = torch.arange(len(prompt), device=dev)
    for _ in range(tokens):
        h = text.model.embed_tokens(ids)
        cos, sin = model.rope(pos, h.dtype)
        end = int(pos[-1]) + 1
        for i, block in enumerate(layers):
            x = block.input_layernorm(h)
            q, k, v = block.self_attn.project(x, cos, sin)
            cache[i, 0, :, pos], cache[i, 1, :, pos] = k, v
            a = F.scaled_dot_product_attention(q, cache[i, 0, :, :end], cache[i, 1, :, :end],
                                               is_causal=len(pos) > 1, enable_gqa=True)
            h = block.finish(h, a.transpose(0, 1))
        token = int(text.logits(h[-1:]).argmax(-1))
        out.append(token)
        ids, pos = torch.tensor([token], device=dev), torch.tensor([end], device=dev)
    return out


@torch.no_grad()
def naive_images(model, vae, tokenizer, prompt_texts, seeds, steps, guidance, shift, latent_shape):
    images = []
    for text, seed in zip(prompt_texts, seeds):
        cond, uncond = prompts.generation_prompt(tokenizer, text), prompts.generation_prompt(tokenizer, "")
        x = initial_noise(latent_shape, seed).to(model.vision.boi.device, model.vision.boi.dtype)
        sigmas = flow_sigmas(steps, shift)
        for sigma, nxt in zip(sigmas[:-1], sigmas[1:]):
            v_c = reference_forward(model, [cond, ImageSegment(x, sigma)])[1][0]
            v_u = reference_forward(model, [uncond, ImageSegment(x, sigma)])[1][0]
            x = x + (nxt - sigma) * guided(v_c, v_u, guidance)
        images.append(x)
    return decode_latents(vae, torch.stack(images))


# Memory bandwidth (bytes/s) of the GPUs this project is checked on, for the achieved fraction of it.
HBM_BYTES_PER_S = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}


def hbm_bandwidth(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((bw for key, bw in HBM_BYTES_PER_S.items() if key in name), None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=str(EMBEDDED_CHECKPOINT))
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--attention-backend", default=None, choices=["torch", "cpu", "triton", "flash-attn"])
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--chat", default="1,16", help="concurrent chat requests, comma-separated")
    p.add_argument("--images", default="1,8", help="concurrent image requests, comma-separated")
    p.add_argument("--baselines-up-to", type=int, default=16,
                   help="run the one-request-at-a-time baselines only up to this many requests")
    for step in ("decode", "denoise"):
        p.add_argument(f"--compile-{step}", action=argparse.BooleanOptionalAction,
                       help=f"torch.compile the engine's {step} step (default: on CUDA only, as the server)")
    p.add_argument("--startup-only", action="store_true", help="print the engine's start-up time and stop")
    p.add_argument("--repeats", type=int, default=3, help="runs per figure (the best is kept)")
    p.add_argument("--only", choices=["chat", "images"], help="one half of the benchmark")
    p.add_argument("--profile", action="store_true", help="also profile one denoising step of 8 requests")
    p.add_argument("--json", type=Path, help="write every figure to this file")
    args = p.parse_args()
    start = time.perf_counter()
    engine = Engine.from_checkpoint(args.checkpoint, EngineConfig(
        device=args.device, dtype=args.dtype, attention_backend=args.attention_backend,
        compile_decode=args.compile_decode,
        compile_denoise=args.compile_denoise))
    engine.capture_graphs()
    startup = time.perf_counter() - start
    config = engine.config
    hf = LlamaForCausalLM.from_pretrained(engine.ckpt.text_tower_dir, dtype=getattr(torch, args.dtype)).to(
        args.device).eval()
    figures = {"checkpoint": args.checkpoint, "device": args.device, "dtype": args.dtype,
               "attention_backend": config.attention_backend,
               "torch_threads": torch.get_num_threads(), "compile_decode": config.compile_decode,
               "compile_denoise": config.compile_denoise, "startup_s": round(startup, 2)}
    if engine.runner.device.type == "cuda":
        figures["gpu"] = torch.cuda.get_device_name(engine.runner.device)
    print(f"checkpoint {args.checkpoint}  {args.device} {args.dtype} {config.attention_backend}  torch threads {torch.get_num_threads()}  "
          f"compile_decode {config.compile_decode}  compile_denoise {config.compile_denoise}  "
          f"engine start-up {startup:.1f} s (compiling included)")
    if not args.startup_only:
        engine.complete(["warm up"], SamplingParams(max_tokens=4))
        if args.only != "images":
            figures["chat"] = chat(engine, hf, args)
        if args.only != "chat":
            figures["images"] = images(engine, args)
    figures["memory"] = memory(engine)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


def counts(text: str) -> list[int]:
    return [int(n) for n in text.split(",") if n.strip()]


def weight_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def kv_bytes_per_token(engine: Engine) -> int:
    """Bytes of K and V one cached text token holds, over all layers."""
    attn = engine.ckpt.model.text.model.layers[0].self_attn
    layers = len(engine.ckpt.model.text.model.layers)
    return 2 * layers * attn.kv_heads * attn.head_dim * engine.ckpt.model.text.model.embed_tokens.weight.element_size()


def memory(engine: Engine) -> dict:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
    out = {"peak_rss_bytes": rss, "weight_bytes": weight_bytes(engine.ckpt.model),
           "kv_budget_bytes": sum(pool.nbytes for pool in engine.runner.pools.values())}
    if engine.runner.device.type == "cuda":
        out["peak_gpu_allocated_bytes"] = torch.cuda.max_memory_allocated(engine.runner.device)
    gib = {k: round(v / 2**30, 2) for k, v in out.items()}
    print(f"\nmemory (GiB): peak RSS {gib['peak_rss_bytes']}, weights {gib['weight_bytes']}, "
          f"KV budget {gib['kv_budget_bytes']}" + (f", peak GPU allocated {gib['peak_gpu_allocated_bytes']}"
                                                    if "peak_gpu_allocated_bytes" in gib else ""))
    return out


def greedy_agrees(engine: Engine, hf, batch: list[list[int]], tokens: int) -> float:
    """The fraction of requests whose greedy tokens are `generate`'s exactly, stop tokens included."""
    stops, same = set(engine.ckpt.eos_token_ids), 0
    reqs = [engine.requests[engine.add_text(ids, SamplingParams(max_tokens=tokens))] for ids in batch]
    engine.run([r.id for r in reqs])
    dev = engine.runner.device
    for r, ids in zip(reqs, batch):
        want = hf.generate(torch.tensor([ids], device=dev), max_new_tokens=tokens, do_sample=False)[0, len(ids):]
        want = want.tolist()
        same += r.output == want[: next((i for i, t in enumerate(want) if t in stops), len(want))]
    return same / len(batch)


def chat(engine: Engine, hf, args) -> list[dict]:
    model, repeats, rows = engine.ckpt.model, args.repeats, []
    params, first = SamplingParams(max_tokens=args.tokens, ignore_eos=True), SamplingParams(max_tokens=1)
    step_bytes_weights = weight_bytes(model.text) - model.text.model.embed_tokens.weight.numel() * \
        model.text.model.embed_tokens.weight.element_size() * (not model.text.tied)  # embeddings: rows only
    bandwidth = hbm_bandwidth(engine.runner.device)
    print(f"\nchat, {args.tokens} new tokens per request (tok/s; decode: the step alone)")
    for n in counts(args.chat):
        batch = chat_ids(engine, n)
        t_engine = timed(lambda: engine.run([engine.add_text(ids, params) for ids in batch]), repeats)
        t_first = timed(lambda: engine.run([engine.add_text(ids, first) for ids in batch]), repeats)
        step = max(t_engine - t_first, 1e-9) / (args.tokens - 1)
        context = sum(len(ids) for ids in batch) + n * args.tokens / 2  # cached tokens read, on average
        step_bytes = step_bytes_weights + context * kv_bytes_per_token(engine)
        row = {"requests": n, "engine_tok_s": n * args.tokens / t_engine, "decode_tok_s": n / step,
               "decode_step_ms": step * 1e3, "decode_bytes_per_s": step_bytes / step,
               "greedy_same_as_transformers": greedy_agrees(engine, hf, batch, min(args.tokens, 32))}
        if n == 1:
            row["time_to_first_token_ms"] = t_first * 1e3
        if bandwidth:
            row["hbm_fraction"] = step_bytes / step / bandwidth
        line = (f"  {n:>2} concurrent: engine {row['engine_tok_s']:8.1f}   decode {row['decode_tok_s']:8.1f} "
                f"({row['decode_step_ms']:.2f} ms/step, {row['decode_bytes_per_s'] / 1e9:.1f} GB/s"
                + (f", {row['hbm_fraction']:.0%} of HBM" if bandwidth else "") + ")")
        if n <= args.baselines_up_to:
            t_hf = timed(lambda: [hf.generate(torch.tensor([ids], device=engine.runner.device),
                                              max_new_tokens=args.tokens, min_new_tokens=args.tokens,
                                              do_sample=False) for ids in batch], repeats)
            t_loop = timed(lambda: [static_loop(model, ids, args.tokens) for ids in batch], repeats)
            row |= {"transformers_tok_s": n * args.tokens / t_hf, "static_loop_tok_s": n * args.tokens / t_loop}
            line += (f"   transformers {row['transformers_tok_s']:8.1f}   static loop {row['static_loop_tok_s']:8.1f}"
                     f"   engine/transformers {t_hf / t_engine:5.2f}x")
        if n == 1:
            line += f"   first token {row['time_to_first_token_ms']:.1f} ms"
        print(line + f"   greedy text as transformers: {row['greedy_same_as_transformers']:.0%}")
        rows.append(row)
    return rows


def images(engine: Engine, args) -> list[dict]:
    model, tok, repeats, rows = engine.ckpt.model, engine.tokenizer, args.repeats, []
    h, w = engine.ckpt.config.image_sizes[0]
    shape = model.vae_info.latent_shape(h, w)
    s = engine.ckpt.config.sampler
    tokens = shape[1] * shape[2] // engine.ckpt.config.patch_size ** 2
    print(f"\nimages, {w}x{h} ({tokens} image tokens), {args.steps} steps, guidance {s.guidance_scale} "
          f"(images/s, VAE decode included)")
    for n in counts(args.images):
        texts, seeds = [f"a small red circle at the top left {i}" for i in range(n)], list(range(n))

        def run_engine():
            ids = [engine.add_image(t, seed=sd, steps=args.steps) for t, sd in zip(texts, seeds)]
            while engine.has_work():
                engine.step()
            return ids

        t_engine = timed(run_engine, repeats)
        t_naive = timed(lambda: naive_images(model, engine.ckpt.vae, tok, texts, seeds, args.steps, s.guidance_scale,
                                             s.shift, shape), repeats)
        rows.append({"requests": n, "engine_images_s": n / t_engine, "naive_images_s": n / t_naive,
                     "engine_over_naive": t_naive / t_engine})
        print(f"  {n:>2} concurrent: engine {n / t_engine:8.2f}   naive {n / t_naive:8.2f}   "
              f"engine/naive {t_naive / t_engine:5.2f}x")
    if args.profile:
        profile_denoising(engine, args.steps)
    return rows


def profile_denoising(engine: Engine, steps: int, n: int = 8) -> None:
    """One engine step while 8 image requests denoise together (their prompts already cached)."""
    from torch.profiler import profile

    ids = [engine.add_image(f"a large blue square at the bottom {i}", seed=i, steps=steps) for i in range(n)]
    engine.step()
    engine.step()
    with profile() as prof:
        engine.step()
    print(f"\none denoising step, {n} requests (CFG: {2 * n} rows)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    engine.run(ids)


if __name__ == "__main__":
    main()
