"""One micro-batch through the model -> its summed losses (X-Fusion, section 3; section 7 for the alignment):
next-token on text answers, flow matching on image answers, and the optional feature alignment."""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..model.latents import decode_pixels
from ..model.sequence import ImageSegment, pad_sequences, padded_forward
from ..model.xfusion import XFusionModel
from .alignment import FeatureAlignment, capture_layer_output


class Losses(NamedTuple):
    """A micro-batch's summed losses (float32 scalars): next-token (summed over answer tokens), flow matching
    and feature alignment (each summed over its images; alignment 0 when off)."""

    ar: torch.Tensor
    dm: torch.Tensor
    align: torch.Tensor


class TrainStep(nn.Module):
    """One micro-batch -> Losses. A module of its own so that DDP or FSDP2 wraps everything that trains.

    alignment: the optional feature alignment (training/alignment.py; X-Fusion section 7, finding iii), with
    the layer whose output it aligns (from 1) and the VAE that decodes each sample's clean latent back to the
    pixels the frozen encoder sees: the last image of a sample, its clean latent x0 ("x0", else the segment's
    own latent, as a caption's image is clean)."""

    def __init__(self, model: XFusionModel, alignment: FeatureAlignment | None = None, align_layer: int = 0,
                 vae: nn.Module | None = None):
        super().__init__()
        if alignment is not None and vae is None:
            raise ValueError("feature alignment needs the VAE to decode the clean images")
        self.model, self.alignment, self.align_layer, self.vae = model, alignment, align_layer, vae

    def frozen_helpers(self) -> list[nn.Module]:
        """The frozen modules beside the model (the VAE, the alignment's encoder): never sharded or trained."""
        return [self.vae, self.alignment.encoder] if self.alignment is not None else []

    def forward(self, batch: list[dict]) -> Losses:
        model = self.model
        seqs = [model.embed_sequence(s["segments"]) for s in batch]
        dev = seqs[0].embeds.device
        with capture_layer_output(model, self.align_layer) if self.alignment else contextlib.nullcontext() as layer:
            out = padded_forward(model, *pad_sequences(seqs))

        ar, dm = out.new_zeros(()).float(), out.new_zeros(()).float()
        for b, (s, seq) in enumerate(zip(batch, seqs)):
            if "velocity" in s:  # generation: flow matching on the last image's tokens (those before: the prompt's)
                sl = seq.image_slices[-1]
                v = model.velocity(out[b, sl][None], *s["velocity"].shape[-2:])[0]
                dm = dm + F.mse_loss(v.float(), s["velocity"].to(dev))
            if s.get("targets"):  # captioning: next-token loss on the answer
                start = len(seq.positions) - len(s["targets"])
                logits = model.text.logits(out[b, start - 1 : len(seq.positions) - 1]).float()
                ar = ar + F.cross_entropy(logits, torch.tensor(s["targets"], device=dev), reduction="sum")
        align = self._alignment(batch, seqs, layer) if self.alignment else out.new_zeros(()).float()
        return Losses(ar, dm, align)

    def _alignment(self, batch: list[dict], seqs: list, layer) -> torch.Tensor:
        """Sum over the batch's samples with an image of the alignment loss of their last image (its tokens at
        the aligned layer against the encoder's features of its clean latent, decoded in one VAE call)."""
        by_shape: dict[tuple, list[int]] = {}
        for b, seq in enumerate(seqs):
            if seq.image_slices:
                by_shape.setdefault(tuple(clean_latent(batch[b]).shape), []).append(b)
        total, p = layer.hidden.new_zeros(()).float(), self.model.config.patch_size
        for (_, h, w), rows in by_shape.items():  # one decode and one encoder pass per image size
            x0 = torch.stack([clean_latent(batch[b]) for b in rows]).to(layer.hidden.device)
            hidden = torch.stack([layer.hidden[b, seqs[b].image_slices[-1]] for b in rows])
            total = total + self.alignment.loss(hidden, decode_pixels(self.vae, x0), (h // p, w // p)) * len(rows)
        return total


def clean_latent(sample: dict) -> torch.Tensor:
    """The clean latent x0 [C, h, w] of a sample's last image: "x0" if the sample says it, else that image's own
    latent when it is clean (t = 0). ValueError for a noised last image whose sample does not say its x0."""
    if "x0" in sample:
        return sample["x0"]
    last = [seg for seg in sample["segments"] if isinstance(seg, ImageSegment)][-1]
    if last.t > 0:
        raise ValueError("feature alignment needs the clean latent of a noised image: the sample must give it "
                         'as "x0"')
    return last.latent
