"""The VAE latent codec: images <-> the scaled latents the model reads and writes.

Scaled latents follow diffusers' convention (SD3's `pipeline_stable_diffusion_3.py`):
encode gives `(z - shift_factor) * scaling_factor`, decode takes `latents / scaling_factor + shift_factor`,
with both factors from the VAE's own config.json (shift 0 where it has none, as SD 1/2 VAEs).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def images_to_tensor(images: list[Image.Image], height: int, width: int) -> torch.Tensor:
    """PIL images -> [B, 3, H, W] float32 in [-1, 1] at the trained size (bicubic resize where they differ)."""
    arr = np.stack([
        np.asarray((im if im.size == (width, height) else im.resize((width, height), Image.BICUBIC)).convert("RGB"),
                   dtype=np.float32)
        for im in images
    ])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0


def tensor_to_images(x: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [-1, 1] (clamped) -> RGB images."""
    arr = ((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


@torch.no_grad()
def encode_images(vae, images: list[Image.Image], height: int, width: int) -> torch.Tensor:
    """Images -> scaled latents [B, C, H/f, W/f] float32, (z - shift) * scale, from the posterior mean:
    deterministic. vae: a diffusers AutoencoderKL."""
    return encode_pixels(vae, images_to_tensor(images, height, width))


@torch.no_grad()
def encode_pixels(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels [B, 3, H, W] in [-1, 1] (images_to_tensor) -> scaled latents [B, C, H/f, W/f] float32, as
    encode_images."""
    z = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode()
    shift = vae.config.shift_factor or 0.0
    return ((z - shift) * vae.config.scaling_factor).float()


@torch.no_grad()
def decode_pixels(vae, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents [B, C, h, w] -> pixels [B, 3, H, W] in [-1, 1] (clamped), float32, on the latents'
    device: z = latents / scale + shift through the VAE decoder. Gradients do not flow (the VAE is frozen)."""
    with torch.no_grad():
        z = latents.to(vae.device, vae.dtype) / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        return vae.decode(z).sample.clamp(-1, 1).float().to(latents.device)


def decode_latents(vae, latents: torch.Tensor) -> list[Image.Image]:
    """Scaled latents [B, C, h, w] -> RGB images (decode_pixels)."""
    return tensor_to_images(decode_pixels(vae, latents))
