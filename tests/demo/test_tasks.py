"""The shapes world's conversation tasks (demo/tasks.py), checked against the spec's own checker."""

from __future__ import annotations

import io
from collections import Counter

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from xfusion_serve import EMBEDDED_CHECKPOINT, ImageSegment
from xfusion_serve.demo.shapes import ATTRIBUTES, read_caption, read_image
from xfusion_serve.demo.tasks import COMPARE, KINDS, QUESTIONS, make_task
from xfusion_serve.model import prompts

N = 300


def text_of(task) -> str:
    return task.messages[-1]["content"][-1]["text"]


def box(image) -> tuple[int, int, int, int]:
    """The object's bounding box (the checker's object pixels: farther than 60 from white)."""
    px = np.asarray(image.convert("RGB"), dtype=np.float32)
    ys, xs = np.nonzero(np.linalg.norm(px - 255.0, axis=-1) > 60)
    return xs.min(), ys.min(), xs.max(), ys.max()


def png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_the_same_seed_and_index_give_the_same_task():
    for i in range(20):
        a, b = make_task(3, i), make_task(3, i)
        assert (a.kind, a.messages, a.answer, a.target, a.named) == (b.kind, b.messages, b.answer, b.target, b.named)
        assert [png(p) for p in a.pictures] == [png(p) for p in b.pictures]
    assert Counter(make_task(3, i).kind for i in range(N)).keys() == set(KINDS)
    with pytest.raises(ValueError, match="unknown task kind"):
        make_task(0, 0, "sing")


def test_draw_prompts_name_exactly_the_attributes_asked_for_in_several_phrasings():
    tasks = [make_task(0, i, "draw") for i in range(N)]
    for t in tasks:
        assert read_caption(text_of(t)) == {a: getattr(t.target, a) if a in t.named else None for a in ATTRIBUTES}
    sizes = Counter(len(t.named) for t in tasks)
    assert set(sizes) == {0, 1, 2, 3, 4} and 0.25 < sizes[4] / N < 0.45  # the full prompt a third of the time
    styles = {(text_of(t).startswith("draw "), " that is " in text_of(t), ", " in text_of(t),
               " corner" in text_of(t)) for t in tasks}
    assert len(styles) >= 5  # "a ...", "draw ...", "... that is ...", "red circle, top left", "... corner"


def test_answers_are_what_the_checker_reads_from_the_pictures():
    which = {q: a for a, qs in QUESTIONS.items() for q in qs}
    for i in range(N // 3):
        q = make_task(1, i, "question")
        assert q.answer == read_image(q.pictures[0])[which[text_of(q)]]
        d = make_task(1, i, "describe")
        assert read_caption(d.answer) == read_image(d.pictures[0])


def test_an_edit_changes_one_attribute_and_keeps_the_other_three():
    changed = Counter()
    for i in range(N // 3):
        t = make_task(2, i, "edit")
        before, after = read_image(t.pictures[0]), read_image(t.target_image)
        assert after == {a: getattr(t.target, a) for a in ATTRIBUTES}
        diff = [a for a in ATTRIBUTES if before[a] != after[a]]
        assert len(diff) == 1, (text_of(t), before, after)
        changed[diff[0]] += 1
        assert diff[0] != "size" or text_of(t) in ("make it bigger", "make it smaller")
        if diff[0] in ("color", "shape"):  # the same picture otherwise: the same place (a triangle's
            # rasterised edge may end a pixel short of the box)
            assert np.abs(np.subtract(box(t.pictures[0]), box(t.target_image))).max() <= 1
    assert set(changed) == set(ATTRIBUTES)


def test_two_picture_questions_are_answered_by_the_checker_and_balanced():
    which = {q: a for a, qs in COMPARE.items() for q in qs}
    answers = Counter()
    for i in range(N // 3):
        t = make_task(4, i, "compare")
        a, b = (read_image(p) for p in t.pictures)
        assert t.answer == ("yes" if a[which[text_of(t)]] == b[which[text_of(t)]] else "no")
        answers[t.answer] += 1
    assert 0.35 < answers["yes"] / sum(answers.values()) < 0.65


def test_tasks_become_the_servers_sequences():
    tok = AutoTokenizer.from_pretrained(EMBEDDED_CHECKPOINT / "text_tower")
    for kind in ("question", "compare", "draw"):
        t = make_task(5, 0, kind)
        latents = [ImageSegment(torch.zeros(4, 8, 8), 0.0) for _ in t.pictures]
        segments = prompts.conversation(tok, t.messages, latents)
        assert sum(isinstance(s, ImageSegment) for s in segments) == len(t.pictures)
        assert tok.decode(segments[-1]).endswith(f"{text_of(t)}<|eot|>\n<|assistant|>\n")


def test_the_task_eval_scores_right_answers_right_and_wrong_ones_wrong(monkeypatch):
    """The scoring of `xfusion-serve eval --tasks`, with an oracle in place of the server and then a liar."""
    import random

    from xfusion_serve.demo import evaluate_tasks
    from xfusion_serve.demo.shapes import render

    def oracle(client, task, seed, text_first, sampler):
        if task.kind == "edit":
            return task.target_image
        if task.kind == "draw":
            return render(task.target, random.Random(seed))
        return f"It is {task.answer}."

    def liar(client, task, seed, text_first, sampler):
        if task.kind in ("draw", "edit"):
            return task.pictures[0] if task.pictures else render(shapes_other(task.target), random.Random(seed))
        return {"yes": "no", "no": "yes"}.get(task.answer, "I do not know")

    def shapes_other(s):
        from dataclasses import replace
        return replace(s, color="black" if s.color != "black" else "red", shape="square" if s.shape != "square"
                       else "circle", size="large" if s.size == "small" else "small",
                       position="center" if s.position != "center" else "top")

    class Serial:
        def _map(self, fn, items):
            return [fn(x) for x in items]

    monkeypatch.setattr(evaluate_tasks, "_answer", oracle)
    right = evaluate_tasks.task_accuracy(Serial(), 12)
    assert set(right) >= {"draw (full)", "draw (partial)", "question", "describe", "edit (changed)",
                          "edit (kept)", "compare"}
    assert all(v == 1.0 for cols in right.values() for v in cols.values()), right
    monkeypatch.setattr(evaluate_tasks, "_answer", liar)
    wrong = evaluate_tasks.task_accuracy(Serial(), 12)
    for row in ("draw (full)", "question", "describe", "edit (changed)", "compare"):
        assert all(v == 0.0 for v in wrong[row].values()), (row, wrong[row])
    assert "draw (full)" in evaluate_tasks.task_report(wrong)


def test_the_task_eval_asks_for_text_then_image_unless_told_to_draw_directly():
    import base64
    import io

    from PIL import Image

    from xfusion_serve.demo import evaluate_tasks
    from xfusion_serve.demo.tasks import make_task

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "white").save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()

    class Recorder:
        bodies = []

        def _post(self, path, body):
            self.bodies.append(body)
            return {"choices": [{"message": {"content": "a", "images": [{"image_url": {"url": url}}]}}]}

        def _map(self, fn, items):
            return [fn(x) for x in items]

    client = Recorder()
    for text_first in (True, False):
        evaluate_tasks._answer(client, make_task(0, 0, "draw"), 3, text_first, {})
        evaluate_tasks._answer(client, make_task(0, 0, "edit"), 3, text_first, {})
    assert [b["modalities"] for b in client.bodies] == [["text", "image"]] * 2 + [["image"]] * 2
    assert all(b["seed"] == 3 and "guidance_scale" not in b for b in client.bodies)

    # The sampler fields of a sweep (benchmarks/sweep_guidance.py) reach every drawing and edit, and only them.
    client.bodies.clear()
    acc = evaluate_tasks.task_accuracy(client, 3, kinds=("draw", "question", "edit"),
                                       sampler={"guidance_scale": 2.5, "steps": 7})
    images = [b for b in client.bodies if "modalities" in b]
    assert len(images) == 6 and len(client.bodies) == 9 and "question" in acc and "describe" not in acc
    assert all(b["guidance_scale"] == 2.5 and b["steps"] == 7 for b in images)
    assert not any("guidance_scale" in b for b in client.bodies if "modalities" not in b)
