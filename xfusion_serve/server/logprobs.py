"""Token log-probabilities in OpenAI's two shapes: chat's `logprobs.content` and legacy completions' columns.

A token's text is what it adds to the answer: the decoding of the few tokens before it and it, less that of
the tokens before it (decoding a token alone loses SentencePiece's leading spaces and the separators a
WordLevel decoder puts between words), special tokens skipped as in the answer's text. So the tokens' texts
join up to the answer and `text_offset` indexes it."""

from __future__ import annotations

from ..engine.text_sampling import TokenLogprobs

CONTEXT = 6  # tokens of context: enough for any decoder's spacing and for a character split over byte tokens


def _text(tokenizer, before: list[int], token: int) -> str:
    context = before[-CONTEXT:]
    prev = tokenizer.decode(context, skip_special_tokens=True)
    full = tokenizer.decode(context + [token], skip_special_tokens=True)
    return full[len(prev):] if full.startswith(prev) else tokenizer.decode([token], skip_special_tokens=True)


class TokenTexts:
    """One choice's tokens as texts, chunk after chunk of a stream (it keeps the tokens and characters seen)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.chars = tokenizer, [], 0

    def chat(self, logprobs: list[TokenLogprobs] | None) -> dict | None:
        """-> {"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}, ...]} (OpenAI chat), or None."""
        if logprobs is None:
            return None
        content = []
        for lp in logprobs:
            def entry(token: int, logprob: float) -> dict:
                text = _text(self.tokenizer, self.ids, token)
                return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

            content.append(entry(lp.token, lp.logprob) | {"top_logprobs": [entry(t, v) for t, v in lp.top]})
            self.ids.append(lp.token)
        return {"content": content}

    def completion(self, logprobs: list[TokenLogprobs] | None) -> dict | None:
        """-> {"tokens", "token_logprobs", "top_logprobs": [{text: logprob}], "text_offset"} (OpenAI completions);
        text_offset counts the answer's characters. Two alternatives that read the same keep the likelier's."""
        if logprobs is None:
            return None
        out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for lp in logprobs:
            text = _text(self.tokenizer, self.ids, lp.token)
            top: dict[str, float] = {}
            for t, v in lp.top:
                top.setdefault(_text(self.tokenizer, self.ids, t), v)
            out["tokens"].append(text)
            out["token_logprobs"].append(lp.logprob)
            out["top_logprobs"].append(top)
            out["text_offset"].append(self.chars)
            self.ids.append(lp.token)
            self.chars += len(text)
        return out
