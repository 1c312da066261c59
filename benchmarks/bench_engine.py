"""Engine throughput against its baselines, on the same weights in one run (not a test: it prints figures).

    python benchmarks/bench_engine.py [--checkpoint DIR] [--tokens 64] [--steps 20] [--repeats 3]
        [--compile-decode] [--compile-denoise] [--startup-only] [--only chat|images] [--profile]

Every figure is the best of `--repeats` runs. `--profile` prints where one denoising step of 8 requests spends
its time (torch.profiler). A real model shape: benchmarks/make_checkpoint.py.

chat tok/s at 1 and 16 concurrent requests:
    engine            continuous batching, paged KV cache
    transformers      `generate` on the text tower, one request after another
    static loop       a bare static-cache greedy decode loop of the same model (the floor)
images/s at 1 and 8 concurrent requests:
    engine            prompt K/V cached once, image tokens only per step, CFG rows batched
    naive             the whole sequence through both towers at every step, two CFG passes
"""

from __future__ import annotations

import argparse
import time

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
    attn0 = layers[0].self_attn
    cache = torch.zeros(len(layers), 2, attn0.kv_heads, len(prompt) + tokens, attn0.head_dim)
    ids, out = torch.tensor(prompt), []
    pos = torch.arange(len(prompt))
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
        ids, pos = torch.tensor([token]), torch.tensor([end])
    return out


@torch.no_grad()
def naive_images(model, vae, tokenizer, prompt_texts, seeds, steps, guidance, shift, latent_shape):
    images = []
    for text, seed in zip(prompt_texts, seeds):
        cond, uncond = prompts.generation_prompt(tokenizer, text), prompts.generation_prompt(tokenizer, "")
        x = initial_noise(latent_shape, seed)
        sigmas = flow_sigmas(steps, shift)
        for sigma, nxt in zip(sigmas[:-1], sigmas[1:]):
            v_c = reference_forward(model, [cond, ImageSegment(x, sigma)])[1][0]
            v_u = reference_forward(model, [uncond, ImageSegment(x, sigma)])[1][0]
            x = x + (nxt - sigma) * guided(v_c, v_u, guidance)
        images.append(x)
    return decode_latents(vae, torch.stack(images))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=str(EMBEDDED_CHECKPOINT))
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    for step in ("decode", "denoise"):
        p.add_argument(f"--compile-{step}", action=argparse.BooleanOptionalAction,
                       help=f"torch.compile the engine's {step} step (default: on CUDA only, as the server)")
    p.add_argument("--startup-only", action="store_true", help="print the engine's start-up time and stop")
    p.add_argument("--repeats", type=int, default=3, help="runs per figure (the best is kept)")
    p.add_argument("--only", choices=["chat", "images"], help="one half of the benchmark")
    p.add_argument("--profile", action="store_true", help="also profile one denoising step of 8 requests")
    args = p.parse_args()
    start = time.perf_counter()
    engine = Engine.from_checkpoint(args.checkpoint, EngineConfig(compile_decode=args.compile_decode,
                                                                    compile_denoise=args.compile_denoise))
    startup = time.perf_counter() - start
    config = engine.config
    hf = LlamaForCausalLM.from_pretrained(engine.ckpt.text_tower_dir, dtype=torch.float32).eval()
    print(f"checkpoint {args.checkpoint}  torch threads {torch.get_num_threads()}  "
          f"compile_decode {config.compile_decode}  compile_denoise {config.compile_denoise}  "
          f"engine start-up {startup:.1f} s (compiling included)")
    if args.startup_only:
        return
    engine.complete(["warm up"], SamplingParams(max_tokens=4))
    if args.only != "images":
        chat(engine, hf, args)
    if args.only != "chat":
        images(engine, args)


def chat(engine: Engine, hf, args) -> None:
    model, repeats = engine.ckpt.model, args.repeats
    params = SamplingParams(max_tokens=args.tokens, ignore_eos=True)
    print(f"\nchat, {args.tokens} new tokens per request (tok/s)")
    for n in (1, 16):
        batch = chat_ids(engine, n)
        t_engine = timed(lambda: engine.run([engine.add_text(ids, params) for ids in batch]), repeats)
        t_hf = timed(lambda: [hf.generate(torch.tensor([ids]), max_new_tokens=args.tokens, min_new_tokens=args.tokens,
                                          do_sample=False) for ids in batch], repeats)
        t_loop = timed(lambda: [static_loop(model, ids, args.tokens) for ids in batch], repeats)
        total = n * args.tokens
        print(f"  {n:>2} concurrent: engine {total / t_engine:8.1f}   transformers {total / t_hf:8.1f}   "
              f"static loop {total / t_loop:8.1f}   engine/transformers {t_hf / t_engine:5.2f}x")



def images(engine: Engine, args) -> None:
    model, tok, repeats = engine.ckpt.model, engine.tokenizer, args.repeats
    h, w = engine.ckpt.config.image_sizes[0]
    vae = model.vae_info
    shape = (vae.latent_channels, h // vae.downsample, w // vae.downsample)
    s = engine.ckpt.config.sampler
    tokens = shape[1] * shape[2] // engine.ckpt.config.patch_size ** 2
    print(f"\nimages, {w}x{h} ({tokens} image tokens), {args.steps} steps, guidance {s.guidance_scale} "
          f"(images/s, VAE decode included)")
    for n in (1, 8):
        texts, seeds = [f"a small red circle at the top left {i}" for i in range(n)], list(range(n))

        def run_engine():
            ids = [engine.add_image(t, seed=sd, steps=args.steps) for t, sd in zip(texts, seeds)]
            while engine.has_work():
                engine.step()
            return ids

        t_engine = timed(run_engine, repeats)
        t_naive = timed(lambda: naive_images(model, engine.ckpt.vae, tok, texts, seeds, args.steps, s.guidance_scale,
                                             s.shift, shape), repeats)
        print(f"  {n:>2} concurrent: engine {n / t_engine:8.2f}   naive {n / t_naive:8.2f}   "
              f"engine/naive {t_naive / t_engine:5.2f}x")
    if args.profile:
        profile_denoising(engine, args.steps)


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
