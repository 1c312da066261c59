"""Token ids -> text, and stop strings: what text a decoding request may stream after each token.

The engine's step gives token ids (`Engine.step_tokens`); an `OutputProcessor` turns them into text events,
as vLLM V1's OutputProcessor does. In the server it runs in the API process, so that the engine process spends
its core on the model; in process (`Engine.step`) it runs right after the step. As vLLM does, each new token
decodes a window of a few tokens rather than the whole output, and text that may still turn into a stop string
is held back until it cannot.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

from .request import Event


@dataclass(eq=False)
class TextState:
    """One text request's output as text: its token ids, the incremental decode and what was streamed."""

    stop: list[str]  # stop strings
    prompt_tokens: int  # what its done event reports
    output: list[int] = field(default_factory=list)
    decoded: str = ""  # the settled text of output[:read_offset]
    prefix_offset: int = 0
    read_offset: int = 0
    text: str = ""  # streamed so far


def detokenize(tokenizer, state: TextState) -> str:
    """The output's settled text, decoding a window of a few tokens per new token rather than the whole
    output: text before prefix_offset is final; a character cut between tokens (a trailing U+FFFD) waits."""
    before = tokenizer.decode(state.output[state.prefix_offset : state.read_offset], skip_special_tokens=True)
    window = tokenizer.decode(state.output[state.prefix_offset :], skip_special_tokens=True)
    if len(window) > len(before) and not window.endswith("\ufffd"):
        state.decoded += window[len(before):]
        state.prefix_offset, state.read_offset = state.read_offset, len(state.output)
    return state.decoded


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


class OutputProcessor:
    """The text requests' token-id events -> text events. Keys are whatever names a request to the caller (a
    request id in process, the API process's key in the server). Not thread-safe: one thread processes.

    A token event gets the text it adds (`text`); a done event gets the whole answer, cut before a stop string.
    A stop string ends a request here, not in the engine: `process` says which, and the caller finishes them in
    the engine (`Engine.finish(request_id, "stop")`) and drops what the engine sent for them meanwhile."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.states: dict[Hashable, TextState] = {}

    def add(self, key: Hashable, stop: list[str], prompt_tokens: int) -> None:
        self.states[key] = TextState(list(stop), prompt_tokens)

    def drop(self, key: Hashable) -> None:
        """Forgets a request that ended without a done event (cancelled)."""
        self.states.pop(key, None)

    def process(self, events: list[tuple[Hashable, Event]]) -> tuple[list[tuple[Hashable, Event]], list[Hashable]]:
        """(key, event) pairs of one step -> (the same with text, the keys a stop string ended while the engine
        still runs them). Events of keys not added (image requests) pass unchanged, and so would those the
        engine sends for a request between its stop string and its finish: the caller drops those."""
        out, stopped = [], []
        for key, ev in events:
            state = self.states.get(key)
            if state is not None:
                text_ev = self._text_event(state, ev)
                if text_ev.kind == "done":
                    del self.states[key]
                    if ev.kind == "token":  # ended here, by a stop string: the engine has yet to hear of it
                        stopped.append(key)
                ev = text_ev
            out.append((key, ev))
        return out, stopped

    def _text_event(self, state: TextState, ev: Event) -> Event:
        state.output += ev.token_ids
        if ev.token_ids:  # a new token: it may complete a stop string (checked before the engine's length)
            text = detokenize(self.tokenizer, state)
            cut = find_stop(text, state.stop)
            if cut >= 0:
                return self._done(state, ev, "stop", text[:cut])
            if ev.kind == "token":
                safe = safe_length(text, state.stop)  # text that may yet become a stop string waits
                delta = text[len(state.text) : safe]
                state.text = text[: max(safe, len(state.text))]
                return Event(ev.request_id, "token", text=delta, token_ids=ev.token_ids, logprobs=ev.logprobs)
        if ev.kind != "done" or ev.error is not None:
            return ev
        return self._done(state, ev, ev.finish_reason, self.tokenizer.decode(state.output, skip_special_tokens=True))

    @staticmethod
    def _done(state: TextState, ev: Event, reason: str, text: str) -> Event:
        """The done event carries the whole text (a streamer sends what its token events had not), the token
        generated in this step if the request ended on one, and the output's length in `step`."""
        return Event(ev.request_id, "done", text=text, token_ids=ev.token_ids, finish_reason=reason,
                     step=len(state.output), prompt_tokens=state.prompt_tokens, logprobs=ev.logprobs)
