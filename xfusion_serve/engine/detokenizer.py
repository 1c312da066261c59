"""Incremental detokenization and stop strings: what text a decoding request may stream after each token.

As vLLM does, each new token decodes a window of a few tokens rather than the whole output, and text that
may still turn into a stop string is held back until it cannot.
"""

from __future__ import annotations

from .request import TextRequest


def detokenize(tokenizer, req: TextRequest) -> str:
    """The output's settled text, decoding a window of a few tokens per new token rather than the whole
    output: text before prefix_offset is final; a character cut between tokens (a trailing U+FFFD) waits."""
    before = tokenizer.decode(req.output[req.prefix_offset : req.read_offset], skip_special_tokens=True)
    window = tokenizer.decode(req.output[req.prefix_offset :], skip_special_tokens=True)
    if len(window) > len(before) and not window.endswith("\ufffd"):
        req.decoded += window[len(before):]
        req.prefix_offset, req.read_offset = req.read_offset, len(req.output)
    return req.decoded


def find_stop(text: str, stops: list[str]) -> int:
    """Index where the earliest stop string starts in text, or -1."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else -1


def safe_length(text: str, stops: list[str]) -> int:
    """How much of text can be streamed now: all of it, less the longest tail that begins some stop string
    (it may complete that stop string with the next token, and a stop string is never sent)."""
    safe = len(text)
    for s in stops:
        for k in range(min(len(s) - 1, safe), 0, -1):
            if text[:safe].endswith(s[:k]):
                safe -= k
                break
    return safe
