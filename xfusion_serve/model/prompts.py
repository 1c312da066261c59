"""How requests become sequences. Training and serving both build them here, so they never drift apart.

caption:     <bos> <boi> image <eoi> [instruction "\\n"] caption <eos>
generation:  <bos> prompt <boi> image <eoi>        (the unconditional row: <bos> <boi> image <eoi>)
conversation: the tokenizer's chat template over every message, each picture where its part stands as
             <boi> image <eoi> (clean); the assistant's turn is text, an image, or text then an image (an edit
             is the user's turn with the pictures, then the instruction)
"""

from __future__ import annotations

import contextlib
import uuid

import jinja2
from transformers import PreTrainedTokenizerBase

from .sequence import ImageSegment, Segment


def _bos(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids if text else []


def caption_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The text before the image of a caption request."""
    return _bos(tokenizer)


def caption_instruction(tokenizer: PreTrainedTokenizerBase, instruction: str | None) -> list[int]:
    """The text after the image, before the answer."""
    instruction = (instruction or "").strip()
    return encode(tokenizer, instruction + "\n") if instruction else []


def generation_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str | None) -> list[int]:
    """The text before the image of a generation request; an empty prompt is the unconditional row."""
    return _bos(tokenizer) + encode(tokenizer, (prompt or "").strip())


def chat_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict], *, add_generation_prompt: bool = True,
                continue_final_message: bool = False) -> list[int]:
    """A conversation ([{"role", "content": str}, ...]) -> the prompt ids of the assistant's next turn: the
    tokenizer's chat template when it has one (exactly what transformers gives), otherwise "role: content"
    lines, then "assistant:". `continue_final_message`: the last (assistant) message is left open, to be
    continued, with no generation prompt after it (as transformers and vLLM do)."""
    if tokenizer.chat_template:
        _check_continue(messages, continue_final_message)
        with _template_errors():
            return tokenizer.apply_chat_template(
                messages, return_dict=False, continue_final_message=continue_final_message,
                add_generation_prompt=add_generation_prompt and not continue_final_message)
    return _text(tokenizer, _render(tokenizer, messages, add_generation_prompt, continue_final_message), True)


def conversation(tokenizer: PreTrainedTokenizerBase, messages: list[dict], images: list[ImageSegment], *,
                 add_generation_prompt: bool = True, continue_final_message: bool = False) -> list[Segment]:
    """A conversation with pictures -> its segments: the chat template's tokens with each picture spliced in
    where its part stands. `messages`: [{"role", "content"}], content a string or a list of parts
    {"type": "text", "text": str} and {"type": "image"}; the image parts take `images` in order (clean VAE
    latents, t = 0). With no image it is `chat_prompt` exactly. Errors: ValueError when the image parts and
    `images` do not pair up."""
    marker = f"<image-{uuid.uuid4().hex}>"  # no text a user sends can forge it
    plain, count = [], 0
    for m in messages:
        content = m["content"]
        if not isinstance(content, str):
            pieces = []
            for part in content:
                if part["type"] == "image":
                    pieces.append(marker)
                    count += 1
                else:
                    pieces.append(part["text"])
            content = "".join(pieces)
        plain.append({"role": m["role"], "content": content})
    if count != len(images):
        raise ValueError(f"{count} image parts for {len(images)} images")
    if not images:
        return [chat_prompt(tokenizer, plain, add_generation_prompt=add_generation_prompt,
                            continue_final_message=continue_final_message)]
    pieces = _render(tokenizer, plain, add_generation_prompt, continue_final_message).split(marker)
    if len(pieces) != len(images) + 1:
        raise ValueError("the chat template dropped or repeated an image part")
    segments: list[Segment] = []
    for i, piece in enumerate(pieces):
        ids = _text(tokenizer, piece, i == 0)
        if ids:
            segments.append(ids)
        if i < len(images):
            segments.append(images[i])
    return segments


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict], add_generation_prompt: bool,
            continue_final_message: bool) -> str:
    _check_continue(messages, continue_final_message)
    if tokenizer.chat_template:
        with _template_errors():
            return tokenizer.apply_chat_template(
                messages, tokenize=False, continue_final_message=continue_final_message,
                add_generation_prompt=add_generation_prompt and not continue_final_message)
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    if continue_final_message:
        return text[:-1]
    return text + ("assistant:" if add_generation_prompt else "")


@contextlib.contextmanager
def _template_errors():
    """A chat template that refuses the conversation (roles that must alternate, no system role, ...) says
    why in a jinja2 error: a ValueError here, which the server answers with a 400."""
    try:
        yield
    except jinja2.TemplateError as e:
        raise ValueError(f"the chat template refused the conversation: {e}") from e


def _check_continue(messages: list[dict], continue_final_message: bool) -> None:
    if continue_final_message and (not messages or messages[-1]["role"] != "assistant"):
        raise ValueError("continue_final_message needs an assistant message last")


def _text(tokenizer: PreTrainedTokenizerBase, text: str, first: bool) -> list[int]:
    """Rendered template text -> ids. A chat template writes its own special tokens (transformers tokenizes
    its output with add_special_tokens=False); the plain "role: content" form gets the usual ones, once."""
    if not text:
        return []
    return tokenizer(text, add_special_tokens=first and not tokenizer.chat_template).input_ids
