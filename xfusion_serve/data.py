"""Image-caption datasets for training: a folder with a JSONL of captions, or the built-in shapes world."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from . import shapes


class CaptionDataset:
    """A list of (image, caption) pairs; images are loaded lazily."""

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, i: int) -> tuple[Image.Image, str]:
        raise NotImplementedError

    def captions(self) -> list[str]:
        return [self[i][1] for i in range(len(self))]


class ShapesDataset(CaptionDataset):
    def __init__(self, size: int, seed: int):
        self.size, self.seed = size, seed

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> tuple[Image.Image, str]:
        shape, image = shapes.sample(self.seed, i)
        return image, shape.caption


class FolderDataset(CaptionDataset):
    """`captions.jsonl` lines like {"file": "cat.png", "caption": "a cat"}, files relative to the folder."""

    def __init__(self, folder: str | Path, captions: str = "captions.jsonl"):
        self.folder = Path(folder)
        path = self.folder / captions
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; a dataset folder needs a JSONL of captions")
        self.items = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                self.items.append((row["file"], str(row["caption"])))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{n}: expected {{\"file\": ..., \"caption\": ...}} ({e})") from e
        if not self.items:
            raise ValueError(f"{path}: no captions")

    def __len__(self) -> int:
        return len(self.items)

    def captions(self) -> list[str]:
        return [caption for _, caption in self.items]

    def __getitem__(self, i: int) -> tuple[Image.Image, str]:
        file, caption = self.items[i]
        with Image.open(self.folder / file) as im:
            return im.convert("RGB"), caption


def open_dataset(spec: str, shapes_size: int, seed: int) -> CaptionDataset:
    return ShapesDataset(shapes_size, seed) if spec == "shapes" else FolderDataset(spec)


def images_to_tensor(images: list[Image.Image], height: int, width: int) -> torch.Tensor:
    """PIL images -> [B, 3, H, W] in [-1, 1] at the trained size (resized where they differ)."""
    arr = np.stack([
        np.asarray((im if im.size == (width, height) else im.resize((width, height), Image.BICUBIC)).convert("RGB"),
                   dtype=np.float32)
        for im in images
    ])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0


def tensor_to_images(x: torch.Tensor) -> list[Image.Image]:
    arr = ((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


@torch.no_grad()
def encode_images(vae, images: list[Image.Image], height: int, width: int) -> torch.Tensor:
    """Images -> scaled latents (z - shift) * scale, using the posterior mean: deterministic."""
    x = images_to_tensor(images, height, width).to(vae.device, vae.dtype)
    z = vae.encode(x).latent_dist.mode()
    shift = vae.config.shift_factor or 0.0
    return ((z - shift) * vae.config.scaling_factor).float()


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> list[Image.Image]:
    z = latents.to(vae.device, vae.dtype) / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
    return tensor_to_images(vae.decode(z).sample)


def encode_dataset(vae, data: CaptionDataset, height: int, width: int, chunk: int = 256,
                   show_progress: bool = True) -> torch.Tensor:
    """Every image of a dataset encoded once: [N, C, h, w] float32 on the CPU."""
    out = []
    for start in tqdm(range(0, len(data), chunk), desc="encode", disable=not show_progress, mininterval=5):
        images = [data[i][0] for i in range(start, min(start + chunk, len(data)))]
        out.append(encode_images(vae, images, height, width).cpu())
    return torch.cat(out)
