"""The shapes world (shared/shapes-world.md): a renderer, captions, and the checker that reads them back."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
COLORS = {
    "red": (230, 25, 25), "green": (30, 170, 50), "blue": (30, 70, 230), "yellow": (245, 210, 20),
    "purple": (140, 40, 190), "orange": (250, 130, 10), "cyan": (20, 200, 220), "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 14, "large": 26}
CELLS = (14, 32, 50)
POSITIONS = {
    "top left": (0, 0), "top": (1, 0), "top right": (2, 0),
    "left": (0, 1), "center": (1, 1), "right": (2, 1),
    "bottom left": (0, 2), "bottom": (1, 2), "bottom right": (2, 2),
}
ATTRIBUTES = ("color", "shape", "size", "position")


@dataclass(frozen=True)
class Shape:
    color: str
    shape: str
    size: str
    position: str

    @property
    def caption(self) -> str:
        return f"a {self.size} {self.color} {self.shape} at the {self.position}"


def all_shapes() -> list[Shape]:
    return [Shape(c, s, z, p) for c in COLORS for s in SHAPES for z in SIZES for p in POSITIONS]


def random_shape(rng: random.Random) -> Shape:
    return Shape(rng.choice(list(COLORS)), rng.choice(SHAPES), rng.choice(list(SIZES)), rng.choice(list(POSITIONS)))


def render(shape: Shape, rng: random.Random) -> Image.Image:
    """Draw one filled object on white; its center is the cell center plus a jitter in -2..2 per axis."""
    img = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    col, row = POSITIONS[shape.position]
    cx, cy = CELLS[col] + rng.randint(-2, 2), CELLS[row] + rng.randint(-2, 2)
    side = SIZES[shape.size]
    x0, y0 = cx - side // 2, cy - side // 2
    x1, y1 = x0 + side - 1, y0 + side - 1  # PIL boxes are inclusive: side pixels across
    fill = COLORS[shape.color]
    if shape.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape.shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    return img


def sample(seed: int, index: int) -> tuple[Shape, Image.Image]:
    """The index-th sample of the world drawn with `seed`: the same pair on every machine."""
    rng = random.Random(f"{seed}:{index}")
    shape = random_shape(rng)
    return shape, render(shape, rng)


def read_image(img: Image.Image) -> dict[str, str | None]:
    """The checker: attributes read back from pixels, as the spec says."""
    px = np.asarray(img.convert("RGB"), dtype=np.float32)
    obj = np.linalg.norm(px - 255.0, axis=-1) > 60
    if not obj.any():
        return dict.fromkeys(ATTRIBUTES)
    ys, xs = np.nonzero(obj)
    median = np.median(px[obj], axis=0)
    color = min(COLORS, key=lambda c: float(np.sum((median - np.array(COLORS[c])) ** 2)))
    w, h = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
    fill = obj.sum() / float(w * h)
    shape = "square" if fill > 0.88 else "circle" if fill >= 0.65 else "triangle"
    size = "small" if max(w, h) < 20 else "large"
    bx, by = (xs.min() + xs.max()) / 2, (ys.min() + ys.max()) / 2
    position = min(POSITIONS, key=lambda p: (CELLS[POSITIONS[p][0]] - bx) ** 2 + (CELLS[POSITIONS[p][1]] - by) ** 2)
    return {"color": color, "shape": shape, "size": size, "position": position}


def read_caption(text: str) -> dict[str, str | None]:
    """The color, shape, size and position words a caption contains (the first of each kind)."""
    text = " ".join(re.findall(r"[a-z]+", text.lower()))

    def first(words) -> str | None:
        hits = [(m.start(), -len(w), w) for w in words for m in re.finditer(rf"\b{w}\b", text)]
        return min(hits)[2] if hits else None  # the earliest, and the longest there ("top left", not "top")

    return {"color": first(COLORS), "shape": first(SHAPES), "size": first(SIZES), "position": first(POSITIONS)}


def score(expected: Shape, read: dict[str, str | None]) -> dict[str, bool]:
    return {a: read[a] == getattr(expected, a) for a in ATTRIBUTES}
