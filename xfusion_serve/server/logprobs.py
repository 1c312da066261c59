"""Token log-probabilities in OpenAI's two shapes: chat's `logprobs.content` and legacy completions' columns."""

from __future__ import annotations

from ..engine.text_sampling import TokenLogprobs


def _piece(tokenizer, token: int) -> str:
    return tokenizer.decode([token])


def chat_logprobs(tokenizer, logprobs: list[TokenLogprobs] | None) -> dict | None:
    """-> {"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}, ...]} (OpenAI chat), or None."""
    if logprobs is None:
        return None

    def entry(token: int, logprob: float) -> dict:
        text = _piece(tokenizer, token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {"content": [entry(lp.token, lp.logprob) | {"top_logprobs": [entry(t, v) for t, v in lp.top]}
                        for lp in logprobs]}


def completion_logprobs(tokenizer, logprobs: list[TokenLogprobs] | None, offset: int = 0) -> dict | None:
    """-> {"tokens", "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"} (OpenAI completions):
    text_offset counts characters of the answer, from `offset` (what earlier chunks of a stream held)."""
    if logprobs is None:
        return None
    tokens = [_piece(tokenizer, lp.token) for lp in logprobs]
    offsets = []
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    tops = []
    for lp in logprobs:  # keyed by text: two tokens that read the same keep the likelier one's value
        top: dict[str, float] = {}
        for t, v in lp.top:
            top.setdefault(_piece(tokenizer, t), v)
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in logprobs], "top_logprobs": tops,
            "text_offset": offsets}
