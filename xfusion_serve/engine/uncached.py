"""The simple, uncached samplers every cached path of the engine is checked against (tests, the naive
baseline of benchmarks/bench_engine.py, the demo's in-process evaluation): whole sequences through the model
at every step, no KV cache, no continuous batching.
"""

from __future__ import annotations

import torch

from ..model import prompts
from ..model.sequence import ImageSegment, pad_sequences, padded_forward
from ..model.xfusion import XFusionModel
from .flow_matching import flow_sigmas, guided, initial_noise


def _run_padded(model: XFusionModel, segment_lists: list[list]) -> tuple[torch.Tensor, list]:
    seqs = [model.embed_sequence(s) for s in segment_lists]
    return padded_forward(model, *pad_sequences(seqs)), seqs


@torch.no_grad()
def sample_images_uncached(model: XFusionModel, tokenizer, prompt_texts: list[str], seeds: list[int],
                           steps: int, guidance_scale: float, shift: float, height: int, width: int,
                           negative_prompt: str = "") -> torch.Tensor:
    """Whole sequences through the model at every step, cond and uncond rows in one batch -> scaled latents."""
    lat_shape = model.vae_info.latent_shape(height, width)
    dev = model.text.model.embed_tokens.weight.device
    x = torch.stack([initial_noise(lat_shape, s) for s in seeds]).to(dev)
    cond = [prompts.generation_prompt(tokenizer, p) for p in prompt_texts]
    uncond = prompts.generation_prompt(tokenizer, negative_prompt)
    use_cfg = guidance_scale != 1.0
    sigmas = flow_sigmas(steps, shift)
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        rows = [[c, ImageSegment(xi, sigma)] for c, xi in zip(cond, x)]
        if use_cfg:
            rows += [[uncond, ImageSegment(xi, sigma)] for xi in x]
        out, seqs = _run_padded(model, rows)
        v = torch.stack([model.velocity(out[b, s.image_slices[0]][None], *lat_shape[1:])[0]
                         for b, s in enumerate(seqs)]).float()
        if use_cfg:
            v = guided(v[: len(x)], v[len(x):], guidance_scale)
        x = x + (sigma_next - sigma) * v
    return x


@torch.no_grad()
def caption_greedy_uncached(model: XFusionModel, tokenizer, latents: torch.Tensor, instruction: str | None,
                            max_new_tokens: int, eos_ids: set[int]) -> list[list[int]]:
    """Greedy captions of clean latents, re-running whole sequences for every token."""
    prefix, instr = prompts.caption_prefix(tokenizer), prompts.caption_instruction(tokenizer, instruction)
    outs: list[list[int]] = [[] for _ in latents]
    live = list(range(len(latents)))
    for _ in range(max_new_tokens):
        if not live:
            break
        rows = [[prefix, ImageSegment(latents[i], 0.0), instr + outs[i]] for i in live]
        out, seqs = _run_padded(model, rows)
        last = torch.stack([out[b, len(s.positions) - 1] for b, s in enumerate(seqs)])
        tokens = model.text.logits(last).argmax(-1).tolist()
        for i, tok in zip(list(live), tokens):
            outs[i].append(tok)
            if tok in eos_ids:
                live.remove(i)
    return [[t for t in o if t not in eos_ids] for o in outs]
