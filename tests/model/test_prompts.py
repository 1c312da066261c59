"""Conversations with pictures become the chat template's tokens with each picture spliced in where it stands."""

from __future__ import annotations

import copy

import pytest
import torch

from xfusion_serve import EMBEDDED_CHECKPOINT, ImageSegment
from xfusion_serve.model import prompts
from transformers import AutoTokenizer


@pytest.fixture(scope="module")
def tok():
    """The embedded default's tokenizer: it has a chat template (bos <|role|>\\n content <|eot|>\\n ...)."""
    return AutoTokenizer.from_pretrained(EMBEDDED_CHECKPOINT / "text_tower")


def pictures(n: int) -> list[ImageSegment]:
    return [ImageSegment(torch.full((4, 8, 8), float(i)), 0.0) for i in range(n)]


def named(segments: list, images: list[ImageSegment]) -> list:
    """Segments with each picture replaced by its index in `images` (by identity: the very object passed)."""
    return [f"image {next(i for i, im in enumerate(images) if im is s)}" if isinstance(s, ImageSegment) else s
            for s in segments]


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False).input_ids


TEXT_ONLY = [
    [{"role": "user", "content": "What shapes are there?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"},
     {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "What colors are there?"}],
    [{"role": "user", "content": [{"type": "text", "text": "Is a circle "}, {"type": "text", "text": "a shape?"}]}],
]


@pytest.mark.parametrize("messages", TEXT_ONLY)
def test_a_conversation_without_pictures_is_the_chat_template_exactly(tok, messages):
    plain = [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else
              "".join(p["text"] for p in m["content"])} for m in messages]
    expected = tok.apply_chat_template(plain, add_generation_prompt=True, return_dict=False)
    assert prompts.conversation(tok, messages, []) == [expected]
    assert prompts.chat_prompt(tok, plain) == expected


def test_pictures_sit_where_their_parts_stand_over_several_turns(tok):
    a, b, c = pictures(3)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "look "}, {"type": "image"}, {"type": "text",
                                     "text": " and "}, {"type": "image"}]},
        {"role": "assistant", "content": "two shapes"},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what now?"}]},
    ]
    got = named(prompts.conversation(tok, messages, [a, b, c]), [a, b, c])
    # Written out by hand from the template's text, each piece tokenized on its own.
    bos = tok.bos_token
    expected = [ids(tok, f"{bos}<|system|>\nBe brief.<|eot|>\n<|user|>\nlook "), "image 0", ids(tok, " and "),
                "image 1", ids(tok, "<|eot|>\n<|assistant|>\ntwo shapes<|eot|>\n<|user|>\n"), "image 2",
                ids(tok, "what now?<|eot|>\n<|assistant|>\n")]
    assert got == expected
    assert got[0][0] == tok.bos_token_id  # the bos once, at the start
    assert sum(x.count(tok.bos_token_id) for x in got if isinstance(x, list)) == 1


def test_two_pictures_in_a_row_and_a_picture_first(tok):
    a, b = pictures(2)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}]}]
    got = named(prompts.conversation(tok, messages, [a, b]), [a, b])
    assert got == [ids(tok, f"{tok.bos_token}<|user|>\n"), "image 0", "image 1", ids(tok, "<|eot|>\n<|assistant|>\n")]


def test_continue_final_message_leaves_the_assistant_turn_open(tok):
    messages = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "there is a"}]
    got = prompts.chat_prompt(tok, messages, continue_final_message=True)
    assert got == ids(tok, f"{tok.bos_token}<|user|>\nHello<|eot|>\n<|assistant|>\nthere is a")
    closed = prompts.chat_prompt(tok, messages, add_generation_prompt=False)
    assert closed == ids(tok, f"{tok.bos_token}<|user|>\nHello<|eot|>\n<|assistant|>\nthere is a<|eot|>\n")
    with pytest.raises(ValueError, match="assistant message last"):
        prompts.chat_prompt(tok, messages[:1], continue_final_message=True)


def test_parts_and_pictures_must_pair_up_and_text_cannot_forge_a_picture(tok):
    with pytest.raises(ValueError, match="1 image parts for 2 images"):
        prompts.conversation(tok, [{"role": "user", "content": [{"type": "image"}]}], pictures(2))
    # Texts a fixed marker might be: none of them becomes a picture.
    forged = [{"role": "user", "content": [{"type": "text", "text": "<image> <|image|> <image-0> <image-> [IMG]"},
                                           {"type": "image"}]}]
    got = prompts.conversation(tok, forged, pictures(1))
    assert sum(isinstance(s, ImageSegment) for s in got) == 1


def test_without_a_chat_template_role_lines_with_pictures(tmp_path):
    from conftest import make_tokenizer

    tok = make_tokenizer(tmp_path)
    assert not tok.chat_template
    (a,) = pictures(1)
    messages = [{"role": "user", "content": [{"type": "text", "text": "a red "}, {"type": "image"}]}]
    got = named(prompts.conversation(tok, messages, [a]), [a])
    assert got == [tok("user: a red ").input_ids, "image 0", ids(tok, "\nassistant:")]
    plain = [{"role": "user", "content": "a red circle"}]
    assert prompts.conversation(tok, plain, []) == [tok("user: a red circle\nassistant:").input_ids]


def test_a_template_that_refuses_the_conversation_is_a_value_error(tok):
    strict = copy.deepcopy(tok)
    strict.chat_template = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}" \
                           "{% endif %}{{ messages[0]['content'] }}"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    for build in (lambda: prompts.chat_prompt(strict, messages),
                  lambda: prompts.conversation(strict, messages[:1] + [{"role": "user", "content": [
                      {"type": "image"}]}], pictures(1))):
        with pytest.raises(ValueError, match="refused the conversation: no system role"):
            build()
