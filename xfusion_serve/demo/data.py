"""The shapes world as training data for the trainer."""

from __future__ import annotations

from PIL import Image

from ..training.datasets import CaptionDataset, FolderDataset
from . import shapes


class ShapesDataset(CaptionDataset):
    """`size` samples of the shapes world drawn with `seed`: (image, full caption) pairs, the same on every
    machine."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed = size, seed

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> tuple[Image.Image, str]:
        shape, image = shapes.sample(self.seed, i)
        return image, shape.caption


def open_dataset(spec: str, shapes_size: int, seed: int) -> CaptionDataset:
    """`xfusion-serve train --dataset`: "shapes" (the built-in world) or a folder holding captions.jsonl."""
    return ShapesDataset(shapes_size, seed) if spec == "shapes" else FolderDataset(spec)
