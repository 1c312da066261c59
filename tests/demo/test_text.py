"""The demo's frozen LM learns the tasks' text: pictures written as their captions, answers it can tell apart."""

from __future__ import annotations

from transformers import AutoTokenizer

from xfusion_serve import EMBEDDED_CHECKPOINT
from xfusion_serve.demo.shapes import COLORS, POSITIONS, SHAPES, SIZES
from xfusion_serve.demo.tasks import make_task
from xfusion_serve.demo.text import LM_KINDS, build_tokenizer, task_chat, task_chats, tokenizer_texts, training_texts


def test_a_task_as_text_puts_each_pictures_caption_in_its_place():
    compare = make_task(4, 1, "compare")
    chat = task_chat(compare)
    a, b = compare.shown
    question = compare.messages[0]["content"][-1]["text"]
    assert chat == [{"role": "user", "content": f"{a.caption}. {b.caption}. {question}"},
                    {"role": "assistant", "content": compare.answer}]
    edit = make_task(4, 2, "edit")
    assert task_chat(edit)[0]["content"].startswith(edit.shown[0].caption + ". ")
    assert task_chat(edit)[-1]["content"] == edit.target.caption  # the caption of the picture it asks for
    draw = make_task(4, 3, "draw")
    assert task_chat(draw) == [{"role": "user", "content": draw.messages[0]["content"][0]["text"]},
                               {"role": "assistant", "content": draw.target.caption}]
    question = make_task(4, 4, "question")
    assert task_chat(question)[-1]["content"] == question.answer
    kinds = [c for c in task_chats(9, 70)]
    assert sum(len(c[0]["content"].split(". ")) >= 3 and c[1]["content"] in ("yes", "no") for c in kinds) == \
        70 * LM_KINDS.count("compare") // len(LM_KINDS)


def test_pretraining_holds_the_task_conversations_in_the_chat_template():
    tok = AutoTokenizer.from_pretrained(EMBEDDED_CHECKPOINT / "text_tower")
    texts = training_texts(tok, 0, tasks=30)
    chats = task_chats(10_000, 30)
    assert texts[-30:] == [tok.apply_chat_template(c, return_dict=False) for c in chats]
    assert tok.decode(texts[-1]).endswith(chats[-1][-1]["content"] + "<|eot|>\n")


def test_the_answers_to_one_question_differ_in_their_first_token(tmp_path):
    """A frozen LM tells answers apart by their output embeddings: the answers one question may get (after the
    template's newline) must begin with different tokens; positions sharing "top"/"bottom" differ later."""
    tok = build_tokenizer(tmp_path, tokenizer_texts(0))

    def ids(word):
        return tok("\n" + word, add_special_tokens=False).input_ids[1:]

    for answers in (COLORS, SHAPES, SIZES, ("yes", "no")):
        assert len({ids(w)[0] for w in answers}) == len(answers), {w: ids(w) for w in answers}
    assert len({ids(w)[0] for w in POSITIONS}) == 5  # top, bottom, left, center, right
