"""The shapes world: the renderer follows the spec and the checker reads every drawing back."""

from __future__ import annotations

import random

import numpy as np

from xfusion_serve.demo import shapes


def test_world_has_432_captions_in_the_spec_form():
    captions = {s.caption for s in shapes.all_shapes()}
    assert len(captions) == 432
    assert "a small red circle at the top left" in captions and "a large cyan triangle at the center" in captions


def test_samples_are_deterministic_for_a_seed():
    a, b, c = shapes.sample(7, 3), shapes.sample(7, 3), shapes.sample(8, 3)
    assert a[0] == b[0] and np.array_equal(np.asarray(a[1]), np.asarray(b[1]))
    assert [shapes.sample(7, i)[0] for i in range(20)] != [shapes.sample(8, i)[0] for i in range(20)]
    assert c[1].size == (64, 64)


def test_geometry_follows_the_spec():
    rng = random.Random(0)
    square = np.asarray(shapes.render(shapes.Shape("black", "square", "large", "center"), rng))
    ys, xs = np.nonzero((square != 255).any(-1))
    assert xs.max() - xs.min() + 1 == 26 and ys.max() - ys.min() + 1 == 26
    assert abs((xs.min() + xs.max()) / 2 - 32) <= 2.5 and abs((ys.min() + ys.max()) / 2 - 32) <= 2.5
    tri = np.asarray(shapes.render(shapes.Shape("red", "triangle", "small", "top left"), random.Random(1)))
    rows = (tri != 255).any(-1).sum(1)
    filled = rows[rows > 0]
    assert filled[0] < filled[-1]  # pointing up: narrow at the top, the base at the bottom
    assert set(map(tuple, tri.reshape(-1, 3))) <= {(255, 255, 255), shapes.COLORS["red"]}  # flat colour


def test_checker_reads_back_every_rendering():
    for i in range(600):
        truth, image = shapes.sample(123, i)
        assert shapes.read_image(image) == {a: getattr(truth, a) for a in shapes.ATTRIBUTES}, truth


def test_caption_reader():
    read = shapes.read_caption("A LARGE cyan triangle, at the top left!")
    assert read == {"color": "cyan", "shape": "triangle", "size": "large", "position": "top left"}
    assert shapes.read_caption("nothing here") == dict.fromkeys(shapes.ATTRIBUTES)
    assert shapes.read_caption("a small blue square at the bottom")["position"] == "bottom"
    blank = shapes.Image.new("RGB", (64, 64), "white")
    assert shapes.read_image(blank) == dict.fromkeys(shapes.ATTRIBUTES)
