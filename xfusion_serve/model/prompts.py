"""How requests become sequences. Training and serving both build them here, so they never drift apart.

caption:     <bos> <boi> image <eoi> [instruction "\\n"] caption <eos>
generation:  <bos> prompt <boi> image <eoi>        (the unconditional row: <bos> <boi> image <eoi>)
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase


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


def chat_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> list[int]:
    """A conversation ([{"role", "content"}, ...]) -> the prompt ids of the assistant's next turn: the
    tokenizer's chat template when it has one (exactly what transformers gives), otherwise "role: content"
    lines, then "assistant:"."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    return tokenizer(text).input_ids
