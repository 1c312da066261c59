"""Feature alignment (X-Fusion section 7, finding iii), in the spirit of REPA (Yu et al. 2024): an optional
training loss that pulls the vision tower's intermediate hidden states of an image's tokens towards a frozen
pretrained image encoder's patch features of the clean image.

    align = FeatureAlignment(cfg.align_encoder, model.text_config.hidden_size).to(device)
    with capture_layer_output(model, cfg.align_layer) as layer:
        out = padded_forward(model, ...)
    loss = loss + cfg.align_weight * align.loss(layer.hidden[b, sl][None], clean_images[b][None])

The encoder (CLIP, SigLIP or DINOv2 through transformers, from a local directory) stays frozen and runs
under torch.no_grad; only the projector (a small MLP, as REPA's) trains, beside the vision tower. The projector
belongs to training alone: a servable checkpoint never holds it.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..model.latents import images_to_tensor
from ..model.xfusion import XFusionModel


def resample_grid(features: torch.Tensor, src: tuple[int, int], dst: tuple[int, int]) -> torch.Tensor:
    """Patch features on one grid -> on another: [B, src_h*src_w, E] -> [B, dst_h*dst_w, E], both row-major
    over patches (as XFusionModel.patchify orders image tokens). Bilinear (align_corners=False, no antialias)
    where the grids differ; the same tensor where they are equal."""
    if tuple(src) == tuple(dst):
        return features
    B, N, E = features.shape
    if N != src[0] * src[1]:
        raise ValueError(f"resample_grid: {N} features do not fill a {src[0]}x{src[1]} grid")
    grid = features.transpose(1, 2).reshape(B, E, *src)
    out = F.interpolate(grid.float(), size=tuple(dst), mode="bilinear", align_corners=False)
    return out.reshape(B, E, dst[0] * dst[1]).transpose(1, 2).to(features.dtype)


def _as_pixels(images: torch.Tensor | list[Image.Image]) -> torch.Tensor:
    """[B, 3, H, W] in [-1, 1] (as the project's VAE takes them), or PIL images of one size -> that tensor."""
    if isinstance(images, torch.Tensor):
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images: expected a [B, 3, H, W] tensor in [-1, 1], got shape {tuple(images.shape)}")
        return images
    sizes = {im.size for im in images}
    if len(sizes) != 1:
        raise ValueError(f"images: PIL images must share one size, got {sorted(sizes)}")
    width, height = sizes.pop()
    return images_to_tensor(list(images), height, width)


class FeatureAlignment(nn.Module):
    """A frozen pretrained image encoder and a trainable projector from X-Fusion's hidden size to the encoder's.

    encoder_dir: a local transformers directory of a ViT-style vision model: CLIPVisionModel, SiglipVisionModel,
    Dinov2Model (a full CLIP/SigLIP model directory works too: its vision model is kept, its text model
    dropped). Its preprocessor_config.json (AutoImageProcessor) gives the input side and the normalisation.
    hidden_size: X-Fusion's hidden size D. projector_dim: the MLP's width (default max(D, encoder width)).
    seed: the MLP's initialisation (the same in every process of a run).

    The whole image is resized (bilinear, antialiased) to the encoder's square input side, never cropped, so
    that encoder patches and latent patches cover the same places; the processor's crop size is that side
    (else its size, else the encoder config's image_size). Features: the encoder's last_hidden_state with
    its CLS/register tokens dropped (whatever precedes the last grid_h * grid_w tokens).
    Raises FileNotFoundError (no such directory) or ValueError (not a supported vision model).
    """

    def __init__(self, encoder_dir: str | Path, hidden_size: int, projector_dim: int | None = None, seed: int = 0):
        super().__init__()
        from transformers import AutoConfig, AutoImageProcessor, AutoModel

        path = Path(encoder_dir)
        if not path.is_dir():
            raise FileNotFoundError(f"feature alignment: no encoder directory at {path}")
        for name in ("config.json", "preprocessor_config.json"):
            if not (path / name).is_file():
                raise FileNotFoundError(f"feature alignment: no {name} in {path} (a transformers vision model "
                                        "directory with its image processor)")
        config = AutoConfig.from_pretrained(path)
        vision_config = getattr(config, "vision_config", None) or config
        if not isinstance(getattr(vision_config, "patch_size", None), int) or not hasattr(vision_config, "hidden_size"):
            raise ValueError(f"feature alignment: {path} holds a {config.model_type!r} model, not a ViT-style "
                             "vision model (CLIP, SigLIP or DINOv2)")
        encoder = AutoModel.from_pretrained(path)
        if hasattr(encoder, "vision_model") and hasattr(encoder, "text_model"):  # a full CLIP/SigLIP model
            encoder = encoder.vision_model
        self.encoder = encoder.eval().requires_grad_(False)
        processor = AutoImageProcessor.from_pretrained(path)
        self.input_side = self._input_side(processor, vision_config)
        self.patch_size = vision_config.patch_size
        if self.input_side % self.patch_size:
            raise ValueError(f"feature alignment: {path}: input side {self.input_side} is not a multiple of the "
                             f"patch size {self.patch_size}")
        self.encoder_grid = (self.input_side // self.patch_size,) * 2
        self.register_buffer("mean", torch.tensor(processor.image_mean, dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(processor.image_std, dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        accepts = inspect.signature(self.encoder.forward).parameters
        self._encoder_kwargs = {"interpolate_pos_encoding": True} if (
            "interpolate_pos_encoding" in accepts and self.input_side != getattr(vision_config, "image_size", None)
        ) else {}
        width = vision_config.hidden_size
        mid = projector_dim or max(hidden_size, width)
        self.hidden_size, self.encoder_size = hidden_size, width
        with torch.random.fork_rng(devices=[]):  # the same MLP in every process, whatever each drew before
            torch.manual_seed(seed)
            self.projector = nn.Sequential(nn.Linear(hidden_size, mid), nn.SiLU(), nn.Linear(mid, mid), nn.SiLU(),
                                           nn.Linear(mid, width))

    @staticmethod
    def _input_side(processor, vision_config) -> int:
        for name in ("crop_size", "size"):
            size = getattr(processor, name, None)
            if size is None or (name == "crop_size" and not getattr(processor, "do_center_crop", False)):
                continue
            if size.get("height") is not None:
                if size.get("height") != size.get("width"):
                    raise ValueError(f"feature alignment: the processor's {name} {dict(size)} is not square")
                return int(size.get("height"))
            if size.get("shortest_edge") is not None:
                return int(size.get("shortest_edge"))
        return int(vision_config.image_size)

    def train(self, mode: bool = True) -> "FeatureAlignment":
        super().train(mode)
        self.encoder.eval()  # frozen: no dropout, ever
        return self

    @torch.no_grad()
    def target_features(self, images: torch.Tensor | list[Image.Image], grid: tuple[int, int]) -> torch.Tensor:
        """Clean images -> the encoder's patch features on the latent patch grid: [B, grid_h * grid_w, E]
        float32, row-major, no gradient. images: a [B, 3, H, W] tensor in [-1, 1] (any float dtype, any
        device) or a list of B PIL images of one size. The features of a fixed dataset image never change:
        a trainer may compute them once and pass them to loss_from_features."""
        x = _as_pixels(images).to(self.mean.device, torch.float32)
        if x.shape[-2:] != (self.input_side,) * 2:
            x = F.interpolate(x, size=(self.input_side,) * 2, mode="bilinear", align_corners=False, antialias=True)
        x = ((x + 1) / 2 - self.mean) / self.std
        dtype = next(self.encoder.parameters()).dtype
        hidden = self.encoder(pixel_values=x.to(dtype), **self._encoder_kwargs).last_hidden_state
        patches = self.encoder_grid[0] * self.encoder_grid[1]
        if hidden.shape[1] < patches:
            raise ValueError(f"feature alignment: the encoder gave {hidden.shape[1]} tokens for a "
                             f"{self.encoder_grid[0]}x{self.encoder_grid[1]} patch grid")
        return resample_grid(hidden[:, -patches:].float(), self.encoder_grid, grid)

    def loss_from_features(self, image_hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """-mean over every token of cos(projector(image_hidden), targets): a float32 scalar in [-1, 1].
        image_hidden [B, N, D] (any float dtype; gradients flow into it and the projector), targets [B, N, E]."""
        if image_hidden.dim() != 3 or image_hidden.shape[-1] != self.hidden_size:
            raise ValueError(f"image_hidden: expected [B, N, {self.hidden_size}], got {tuple(image_hidden.shape)}")
        if targets.shape != (*image_hidden.shape[:2], self.encoder_size):
            raise ValueError(f"targets: expected {(*image_hidden.shape[:2], self.encoder_size)}, "
                             f"got {tuple(targets.shape)}")
        projected = self.projector(image_hidden)
        cos = F.cosine_similarity(projected.float(), targets.to(projected.device, torch.float32), dim=-1)
        return -cos.mean()

    def loss(self, image_hidden: torch.Tensor, images: torch.Tensor | list[Image.Image],
             grid: tuple[int, int] | None = None) -> torch.Tensor:
        """The alignment loss of B images: a float32 scalar, -mean over tokens of the cosine similarity between
        the projected hidden states and the encoder's patch features of the clean images.

        image_hidden: [B, N, D], the hidden states of one image's N = grid_h * grid_w tokens per sample at the
        aligned layer, row-major over latent patches (XFusionModel.patchify's order). images: the clean images,
        a [B, 3, H, W] tensor in [-1, 1] or B PIL images of one size. grid: (grid_h, grid_w); default: the one
        with N tokens and the images' aspect ratio. Raises ValueError on mismatched shapes or no such grid."""
        pixels = _as_pixels(images)
        if pixels.shape[0] != image_hidden.shape[0]:
            raise ValueError(f"{pixels.shape[0]} images for {image_hidden.shape[0]} rows of hidden states")
        if grid is None:
            grid = grid_for(image_hidden.shape[1], pixels.shape[-2], pixels.shape[-1])
        if grid[0] * grid[1] != image_hidden.shape[1]:
            raise ValueError(f"grid {grid} has {grid[0] * grid[1]} patches, image_hidden {image_hidden.shape[1]}")
        return self.loss_from_features(image_hidden, self.target_features(pixels, grid))


def grid_for(tokens: int, height: int, width: int) -> tuple[int, int]:
    """The patch grid (h, w) with h * w == tokens and h / w == height / width; ValueError if there is none."""
    h = round(math.sqrt(tokens * height / width))
    if h < 1 or tokens % h or (tokens // h) * height != h * width:
        raise ValueError(f"no patch grid of {tokens} tokens has the images' aspect {height}x{width}: pass grid=")
    return h, tokens // h


class CapturedLayer:
    """What capture_layer_output yields: `.hidden`, the hidden states after the chosen layer in forward's own
    shape ([B, T, D] for a padded batch), taken from the last forward run inside the block."""

    def __init__(self, layer: int):
        self.layer, self._hidden = layer, None

    @property
    def hidden(self) -> torch.Tensor:
        if self._hidden is None:
            raise RuntimeError(f"layer {self.layer}'s output was not captured: no mixed text-and-image forward "
                               "ran inside capture_layer_output (decode and denoising steps never report it)")
        return self._hidden


@contextmanager
def capture_layer_output(model: XFusionModel, layer: int) -> Iterator[CapturedLayer]:
    """Within the block, every XFusionModel.forward keeps the hidden states after block `layer` (counted from 1:
    1 = the first block's output, num_hidden_layers = the last one's, before the final norm), gradients and
    all; an image's tokens there are the vision tower's output (X-Fuse-mixed under X-Fuse). Index them as the
    final output is indexed (hidden[b, seq.image_slices[k]]). The model's hook is restored on exit.
    Raises ValueError for a layer outside 1..num_hidden_layers, RuntimeError if a hook is already set."""
    layers = len(model.vision.layers)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 1 <= layer <= layers:
        raise ValueError(f"align layer counts vision blocks from 1 to {layers}, not {layer!r}")
    if model.layer_output_hook is not None:
        raise RuntimeError("capture_layer_output: the model already has a layer_output_hook")
    captured = CapturedLayer(layer)

    def hook(index: int, hidden: torch.Tensor) -> None:
        if index == layer - 1:
            captured._hidden = hidden

    model.layer_output_hook = hook
    try:
        yield captured
    finally:
        del model.layer_output_hook  # back to the class's None
