"""Image-caption datasets for training, and their latents encoded once before the first step."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from ..model.latents import encode_images


class CaptionDataset:
    """A list of (image, caption) pairs; images are loaded lazily."""

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, i: int) -> tuple[Image.Image, str]:
        raise NotImplementedError

    def captions(self) -> list[str]:
        return [self[i][1] for i in range(len(self))]


class FolderDataset(CaptionDataset):
    """`captions.jsonl` lines like {"file": "cat.png", "caption": "a cat"}, files relative to the folder.
    Raises FileNotFoundError without the JSONL, ValueError (naming the line) for a malformed one."""

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


def encode_dataset(vae, data: CaptionDataset, height: int, width: int, chunk: int = 256,
                   show_progress: bool = True) -> torch.Tensor:
    """Every image of a dataset encoded once: [N, C, h, w] float32 on the CPU."""
    out = []
    for start in tqdm(range(0, len(data), chunk), desc="encode", disable=not show_progress, mininterval=5):
        images = [data[i][0] for i in range(start, min(start + chunk, len(data)))]
        out.append(encode_images(vae, images, height, width).cpu())
    return torch.cat(out)
