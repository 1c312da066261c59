"""The conversation tasks of demo/tasks.py measured through a running server, on fresh seeds, with the spec's
checker: drawing from full and from partial prompts (scored on the named attributes only), one-attribute
questions, whole-caption requests, edits (the changed attribute, and the three that must stay) and
two-picture questions. Every task goes through /v1/chat as a conversation, pictures as data URIs; drawings
and edits come back as the answer's images, after its text (`modalities: ["text", "image"]`: the recipe's
CAPTION_FIRST).
"""

from __future__ import annotations

import base64
import io

from PIL import Image

from . import shapes
from .evaluate import EVAL_SEED, OverHTTP
from .tasks import QUESTIONS, Task, make_task

TASK_SEED = EVAL_SEED + 7  # fresh: never a training seed
KINDS = ("draw", "question", "describe", "edit", "compare")


def openai_messages(task: Task) -> list[dict]:
    """A task's conversation with its pictures as OpenAI image_url parts (PNG data URIs), in order."""
    from ..server.schemas import image_to_base64

    pictures = iter(task.pictures)
    out = []
    for m in task.messages:
        parts = [p if p["type"] == "text" else {"type": "image_url", "image_url": {
            "url": "data:image/png;base64," + image_to_base64(next(pictures))}} for p in m["content"]]
        out.append({"role": m["role"], "content": parts})
    return out


def _answer(client: OverHTTP, task: Task, seed: int, text_first: bool, sampler: dict) -> str | Image.Image:
    body = {"messages": openai_messages(task), "max_tokens": 24}
    if task.target is not None:  # draw or edit: (the caption of what it draws, then) the image
        body |= {"modalities": ["text", "image"] if text_first else ["image"], "seed": seed, **sampler}
        url = client._post("/v1/chat", body)["choices"][0]["message"]["images"][0]["image_url"]["url"]
        return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")
    return client._post("/v1/chat", body)["choices"][0]["message"]["content"]


def task_accuracy(client: OverHTTP, n: int, seed: int = TASK_SEED, text_first: bool = True,
                  kinds: tuple[str, ...] = KINDS, sampler: dict | None = None) -> dict[str, dict[str, float]]:
    """n tasks of each of `kinds` -> {row: {column: accuracy}}; rows: draw (full), draw (partial), question,
    describe, edit (changed), edit (kept), compare. `text_first`: drawings and edits asked with modalities
    ["text", "image"] (the recipe's CAPTION_FIRST), else ["image"] (the first demo's way). `sampler`: fields
    added to every drawing and edit request (e.g. {"guidance_scale": 2.0}; default: the server's)."""
    which = {q: a for a, qs in QUESTIONS.items() for q in qs}
    rows: dict[str, dict[str, list[bool]]] = {}

    def hit(row: str, column: str, ok: bool) -> None:
        rows.setdefault(row, {}).setdefault(column, []).append(ok)

    tasks = [make_task(seed, i, kind) for kind in kinds for i in range(n)]
    answers = client._map(lambda it: _answer(client, it[1], seed + it[0], text_first, sampler or {}),
                          list(enumerate(tasks)))
    for t, answer in zip(tasks, answers):
        text = t.messages[-1]["content"][-1]["text"]
        if t.kind == "draw":
            read = shapes.read_image(answer)
            for a in t.named:
                hit("draw (full)" if len(t.named) == 4 else "draw (partial)", a, read[a] == getattr(t.target, a))
        elif t.kind == "question":
            a = which[text]
            hit("question", a, shapes.read_caption(answer)[a] == t.answer)
        elif t.kind == "describe":
            read, truth = shapes.read_caption(answer), shapes.read_caption(t.answer)
            for a in shapes.ATTRIBUTES:
                hit("describe", a, read[a] == truth[a])
        elif t.kind == "edit":
            before, after = shapes.read_image(t.pictures[0]), shapes.read_image(answer)
            for a in shapes.ATTRIBUTES:
                changed = before[a] != getattr(t.target, a)
                hit("edit (changed)" if changed else "edit (kept)", a, after[a] == getattr(t.target, a))
        else:
            said = "yes" if "yes" in answer.lower() else "no" if "no" in answer.lower() else None
            hit("compare", "yes/no", said == t.answer)
    return {row: {c: sum(v) / len(v) for c, v in cols.items()} for row, cols in rows.items()}


def task_report(acc: dict[str, dict[str, float]]) -> str:
    columns = list(shapes.ATTRIBUTES) + ["yes/no"]
    lines = [f"{'task':<15}" + "".join(f"{c:>10}" for c in columns)]
    for row, cols in acc.items():
        lines.append(f"{row:<15}" + "".join(f"{cols[c]:>10.1%}" if c in cols else f"{'':>10}" for c in columns))
    return "\n".join(lines)
