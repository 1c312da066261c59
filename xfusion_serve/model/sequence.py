"""Sequences of text and images, and the full-sequence (uncached) forward of a padded batch.

A sequence is a list of segments: text ids, or an `ImageSegment` (a scaled VAE latent at a noise level).
Text attends causally; the tokens of one image see each other both ways (X-Fusion, section 4).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .xfusion import XFusionModel


@dataclass
class ImageSegment:
    """An image in a sequence: its scaled VAE latent [C, h, w] and its noise level t (0 = clean)."""

    latent: torch.Tensor
    t: float


Segment = list[int] | ImageSegment


def image_tokens(latent: torch.Tensor | tuple[int, ...], patch_size: int) -> int:
    """Tokens of an image latent [..., C, h, w] (or its shape): one per patch_size x patch_size patch."""
    shape = latent.shape if isinstance(latent, torch.Tensor) else latent
    return (shape[-2] // patch_size) * (shape[-1] // patch_size)


def sequence_length(segments: list[Segment], patch_size: int) -> int:
    """Positions a sequence takes: its text ids, and each image's tokens with its begin/end-of-image."""
    return sum(image_tokens(s.latent, patch_size) + 2 if isinstance(s, ImageSegment) else len(s) for s in segments)


def sequence_key(segments: list[Segment]) -> tuple:
    """A hashable key that is equal for equal sequences: text ids as they are, each image by its noise level,
    shape and a digest of its latent's bytes (two requests with the same picture share a cached prompt)."""
    key: list = []
    for s in segments:
        if isinstance(s, ImageSegment):
            data = s.latent.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
            key.append(("image", s.t, tuple(s.latent.shape), hashlib.sha256(data).hexdigest()))
        else:
            key.extend(s)
    return tuple(key)


def text_only(segments: list[Segment]) -> bool:
    return not any(isinstance(s, ImageSegment) for s in segments)


@dataclass
class SequenceInputs:
    embeds: torch.Tensor  # [T, D]
    positions: torch.Tensor  # [T]
    image_ids: torch.Tensor  # [T]: index of the image a token belongs to, -1 for text (boi/eoi are text)
    image_slices: list[slice]  # where each image's tokens sit, in order

    @property
    def is_image(self) -> torch.Tensor:
        return self.image_ids >= 0


def attention_mask(image_ids: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """[B, T] image ids -> [B, 1, T, T] bool: causal, except that the tokens of one image see each other."""
    T = image_ids.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=image_ids.device).tril()
    same_image = (image_ids[:, :, None] == image_ids[:, None, :]) & (image_ids[:, :, None] >= 0)
    allowed = causal | same_image
    if valid is not None:  # padding: no query sees a pad key; a pad query sees itself so softmax stays finite
        allowed = (allowed & valid[:, None, :]) | torch.eye(T, dtype=torch.bool, device=image_ids.device)
    return allowed[:, None]


class AttentionFn(Protocol):
    """What the layer loop asks of attention: q [..., Hq, T, d] (None when no query needs it now) and
    k/v [..., Hkv, T, d] in, the output [..., T, Hq, d] out (token-major, so the model can pick its rows)."""

    def keeps(self, tower: str) -> bool:
        """Whether this tower's keys/values are stored for later steps, even with no query now."""

    def __call__(self, tower: str, layer: int, q: torch.Tensor | None, k: torch.Tensor,
                 v: torch.Tensor) -> torch.Tensor | None: ...


class MaskedAttention:
    """Attention over whole sequences with a [B, 1, T, T] bool mask; nothing is cached."""

    def __init__(self, mask: torch.Tensor):
        self.mask = mask

    def keeps(self, tower: str) -> bool:
        return False

    def __call__(self, tower: str, layer: int, q, k, v) -> torch.Tensor | None:
        if q is None:
            return None
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, enable_gqa=True).transpose(-2, -3)


def padded_forward(model: "XFusionModel", h: torch.Tensor, positions: torch.Tensor, image_ids: torch.Tensor,
                   valid: torch.Tensor | None = None) -> torch.Tensor:
    """The full-sequence forward of a padded batch [B, T, D] (training, uncached sampling, tests)."""
    return model(h, positions, image_ids, MaskedAttention(attention_mask(image_ids, valid)))


def pad_sequences(seqs: list["SequenceInputs"]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sequences of different lengths -> right-padded (embeds, positions, image_ids, valid)."""
    T, first = max(len(s.positions) for s in seqs), seqs[0].embeds
    h = first.new_zeros(len(seqs), T, first.shape[-1])
    positions = torch.zeros(len(seqs), T, dtype=torch.long, device=first.device)
    image_ids = torch.full((len(seqs), T), -1, dtype=torch.long, device=first.device)
    valid = torch.zeros(len(seqs), T, dtype=torch.bool, device=first.device)
    for b, s in enumerate(seqs):
        n = len(s.positions)
        h[b, :n], positions[b, :n], image_ids[b, :n], valid[b, :n] = s.embeds, s.positions, s.image_ids, True
    return h, positions, image_ids, valid
