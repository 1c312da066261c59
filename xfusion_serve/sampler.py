"""Flow-matching sampling pieces and the simple, uncached samplers the engine is checked against.

Schedule: diffusers' FlowMatchEulerDiscreteScheduler sigmas with SD3's shift, kept on the CPU as plain
floats (per request: a diffusers scheduler object keeps a step index and cannot be shared).
Step: x_next = x + (sigma_next - sigma) * v, with v = noise - x0 and x_sigma = (1 - sigma) x0 + sigma noise.
"""

from __future__ import annotations

import torch

from . import prompts
from .model import ImageSegment, XFusionModel, pad_sequences, padded_forward


def flow_sigmas(steps: int, shift: float) -> list[float]:
    """steps + 1 noise levels from 1 (pure noise) down to 0 (the image)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    sched.set_timesteps(steps, device="cpu")
    return [float(s) for s in sched.sigmas]


def initial_noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The starting latent of one image: drawn on the CPU so a seed gives the same image on every device."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def guided(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    return v_uncond + scale * (v_cond - v_uncond)


def _run_padded(model: XFusionModel, segment_lists: list[list]) -> tuple[torch.Tensor, list]:
    seqs = [model.embed_sequence(s) for s in segment_lists]
    return padded_forward(model, *pad_sequences(seqs)), seqs


@torch.no_grad()
def sample_images_uncached(model: XFusionModel, tokenizer, prompt_texts: list[str], seeds: list[int],
                           steps: int, guidance_scale: float, shift: float, height: int, width: int,
                           negative_prompt: str = "") -> torch.Tensor:
    """Whole sequences through the model at every step, cond and uncond rows in one batch -> scaled latents."""
    vae = model.vae_info
    lat_shape = (vae.latent_channels, height // vae.downsample, width // vae.downsample)
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
