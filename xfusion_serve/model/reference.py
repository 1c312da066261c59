"""The reference forward: one sequence, no cache, no batching, both towers over every token.

It is written to be obviously right, not fast; every optimised path (batched training forward, the
engine's cached prefill and decode, the attention kernels) is tested against it.
"""

from __future__ import annotations

import torch

from .llama import Block, apply_rope
from .sequence import ImageSegment, Segment
from .xfusion import XFusionModel


def masked_attention(block: Block, x: torch.Tensor, allowed: torch.Tensor, cos, sin) -> torch.Tensor:
    """Softmax attention of one block over a [T, D] sequence with an explicit [T, T] bool mask."""
    attn = block.self_attn
    q = apply_rope(attn._split(attn.q_proj(x), attn.heads), cos, sin)  # [H, T, d]
    k = apply_rope(attn._split(attn.k_proj(x), attn.kv_heads), cos, sin)
    v = attn._split(attn.v_proj(x), attn.kv_heads)
    group = attn.heads // attn.kv_heads  # grouped-query attention: each K/V head serves `group` query heads
    k, v = k.repeat_interleave(group, dim=0), v.repeat_interleave(group, dim=0)
    scores = (q @ k.transpose(-1, -2)).float() / attn.head_dim**0.5
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (scores.softmax(-1).to(v.dtype) @ v).transpose(0, 1)  # [T, H, d]


def block_forward(block: Block, h: torch.Tensor, allowed: torch.Tensor, cos, sin) -> torch.Tensor:
    return block.finish(h, masked_attention(block, block.input_layernorm(h), allowed, cos, sin))


def sequence_mask(image_ids: torch.Tensor) -> torch.Tensor:
    """Token i sees token j when j <= i, or when both belong to the same image."""
    T = len(image_ids)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    same_image = (image_ids[:, None] == image_ids[None, :]) & (image_ids[:, None] >= 0)
    return (j <= i) | same_image


@torch.no_grad()
def reference_forward(model: XFusionModel, segments: list[Segment]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """-> (text logits [T, V] at every position, predicted velocity [C, h, w] for each image)."""
    seq = model.embed_sequence(segments)
    allowed = sequence_mask(seq.image_ids.cpu()).to(seq.embeds.device)
    is_image = seq.is_image[:, None]
    cos, sin = model.rope(seq.positions, seq.embeds.dtype)
    vcos, vsin = model.vision_rope(seq.positions, seq.embeds.dtype)
    h = seq.embeds
    for i, (text_block, vision_block) in enumerate(zip(model.text.model.layers, model.vision.layers)):
        h_text = block_forward(text_block, h, allowed, cos, sin)
        h_image = block_forward(vision_block, h, allowed, vcos, vsin)
        if model.config.xfuse:  # X-Fuse: image tokens mix both towers' outputs
            h_image = model.vision.xfuse_alpha[i] * h_image + model.vision.xfuse_beta[i] * h_text
        h = torch.where(is_image, h_image, h_text)
    images = [s for s in segments if isinstance(s, ImageSegment)]
    velocities = [
        model.velocity(h[sl][None], *img.latent.shape[-2:])[0] for sl, img in zip(seq.image_slices, images)
    ]
    return model.text.logits(h), velocities


@torch.no_grad()
def reference_greedy(model: XFusionModel, segments: list[Segment], max_new_tokens: int,
                     eos_ids: set[int]) -> list[int]:
    """Greedy decoding by re-running the whole sequence for every token; stops on any eos id."""
    out: list[int] = []
    for _ in range(max_new_tokens):
        logits, _ = reference_forward(model, segments + [out] if out else segments)
        token = int(logits[-1].argmax())
        out.append(token)
        if token in eos_ids:
            break
    return out
