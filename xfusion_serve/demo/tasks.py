"""What people type to the shapes world, as conversations: drawing from partial prompts in several phrasings,
questions about one attribute of a picture, whole-caption requests, edits, and two-picture comparisons.

Each task is a conversation in the form model/prompts.conversation takes ({"type": "image"} parts, pictures
in order), so training and serving build the same sequences, with its target: the answer's text, or the
shape to draw (and, for an edit, the picture the spec's renderer draws for it). The pictures and captions
are the spec's (shared/shapes-world.md); the same (seed, index) gives the same task on every machine.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

from PIL import Image

from .shapes import ATTRIBUTES, COLORS, POSITIONS, SHAPES, SIZES, Shape, random_shape, render

KINDS = ("draw", "question", "describe", "edit", "compare")
CORNERS = {"top left", "top right", "bottom left", "bottom right"}

QUESTIONS = {
    "color": ["What color is the shape?", "What color is it?", "Which color does the shape have?"],
    "shape": ["What shape is it?", "Is it a circle, a square or a triangle?", "What kind of shape is this?"],
    "size": ["Is it small or large?", "How big is the shape?", "Is the shape large or small?"],
    "position": ["Where is it?", "Where is the shape?", "In which part of the picture is the shape?"],
}
DESCRIBE = ["Describe the image.", "What is in this picture?", "Caption this image.", "What do you see?",
            "Describe the shape in the picture."]
COMPARE = {"color": ["Are these the same color?", "Do the two shapes have the same color?"],
           "shape": ["Are these the same shape?", "Are both pictures the same kind of shape?"]}


@dataclass
class Task:
    """One conversation and its target. `answer`: the assistant's text; `target`: the shape to draw (its
    `named` attributes are the ones the prompt asked for; an edit's target differs from the picture in one)."""

    kind: str
    messages: list[dict]
    pictures: list[Image.Image] = field(default_factory=list)
    answer: str | None = None
    target: Shape | None = None
    named: tuple[str, ...] = ATTRIBUTES
    target_image: Image.Image | None = None  # an edit's: the picture with the one attribute changed
    shown: list[Shape] = field(default_factory=list)  # what each picture shows, in order


def _user(text: str, pictures: int = 0) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}] * pictures + [{"type": "text", "text": text}]}]


def draw_prompt(shape: Shape, named: tuple[str, ...], rng: random.Random) -> str:
    """A prompt naming exactly `named` of the shape's attributes, in one of several phrasings."""
    adjectives = [getattr(shape, a) for a in ("size", "color") if a in named]
    noun = shape.shape if "shape" in named else rng.choice(["shape", "one", "object"])
    if noun == "one" and not adjectives:
        noun = "shape"
    where = ""
    if "position" in named:
        corner = " corner" if shape.position in CORNERS and rng.random() < 0.5 else ""
        prep = "on" if shape.position in ("left", "right") else "in"
        where = rng.choice([f" at the {shape.position}", f" {prep} the {shape.position}{corner}",
                            f", {shape.position}"])
    style = rng.randrange(4)
    if style == 1 and "color" in named and "shape" in named:  # "a small triangle that is green"
        rest = [a for a in adjectives if a != shape.color]
        return f"{_a(' '.join(rest + [shape.shape]))} that is {shape.color}{where}"
    phrase = " ".join(adjectives + [noun])
    if style == 2:
        return f"draw {_a(phrase)}{where}"
    if style == 3 and where.startswith(", "):
        return f"{phrase}{where}"
    return f"{_a(phrase)}{where}"


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def make_task(seed: int, index: int, kind: str | None = None) -> Task:
    """The index-th task of the world drawn with `seed` (its kind drawn too, unless given)."""
    rng = random.Random(f"tasks:{seed}:{index}")
    kind = kind or rng.choice(KINDS)
    shape = random_shape(rng)
    jitter_seed = rng.randrange(2**31)  # the same jitter for a picture and its edit

    def picture(s: Shape) -> Image.Image:
        return render(s, random.Random(jitter_seed))

    if kind == "draw":
        k = rng.choice([0, 1, 2, 3, 4, 4])  # the full prompt a third of the time
        named = tuple(a for a in ATTRIBUTES if a in rng.sample(ATTRIBUTES, k))
        return Task(kind, _user(draw_prompt(shape, named, rng)), target=shape, named=named)
    if kind == "question":
        attribute = rng.choice(ATTRIBUTES)
        return Task(kind, _user(rng.choice(QUESTIONS[attribute]), 1), [picture(shape)],
                    answer=getattr(shape, attribute), shown=[shape])
    if kind == "describe":
        return Task(kind, _user(rng.choice(DESCRIBE), 1), [picture(shape)], answer=shape.caption, shown=[shape])
    if kind == "edit":
        attribute = rng.choice(ATTRIBUTES)
        values = {"color": list(COLORS), "shape": list(SHAPES), "size": list(SIZES), "position": list(POSITIONS)}
        new = rng.choice([v for v in values[attribute] if v != getattr(shape, attribute)])
        target = replace(shape, **{attribute: new})
        text = {"color": f"make it {new}", "shape": f"turn it into a {new}", "position": f"move it to the {new}",
                "size": "make it bigger" if new == "large" else "make it smaller"}[attribute]
        return Task(kind, _user(text, 1), [picture(shape)], target=target, target_image=picture(target),
                    shown=[shape])
    if kind == "compare":
        attribute = rng.choice(["color", "shape"])
        same = rng.random() < 0.5
        values = list(COLORS) if attribute == "color" else list(SHAPES)
        value = getattr(shape, attribute) if same else rng.choice([v for v in values if v != getattr(shape, attribute)])
        other = replace(random_shape(rng), **{attribute: value})
        return Task(kind, _user(rng.choice(COMPARE[attribute]), 2), [picture(shape), picture(other)],
                    answer="yes" if same else "no", shown=[shape, other])
    raise ValueError(f"unknown task kind {kind!r}; one of {KINDS}")
