"""Token ids -> text (engine/detokenizer.py's OutputProcessor), which runs in the API process in the server:
text streamed piece by piece adds up to the whole decode, a stop string is never sent and ends the request
(told to the caller only when the engine still runs it), and what is not a text request's passes unchanged.
Expected values come from the tokenizer's own decode and str.find, not from the code under test."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from xfusion_serve import EMBEDDED_CHECKPOINT
from xfusion_serve.engine.detokenizer import OutputProcessor
from xfusion_serve.engine.request import Event

TEXT = "a small red circle at the top left, café ☕ and a blue square"


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(EMBEDDED_CHECKPOINT / "text_tower")


def tokens(tok, text=TEXT) -> list[int]:
    return tok(text, add_special_tokens=False).input_ids


def feed(proc: OutputProcessor, key, ids: list[int], last: Event | None = None):
    """Each id as the engine's token event, then `last` (a done event) -> (text events, stopped keys)."""
    out, stopped = [], []
    for t in ids:
        events, s = proc.process([(key, Event(str(key), "token", token_ids=[t]))])
        out += [ev for _, ev in events]
        stopped += s
    if last is not None:
        events, s = proc.process([(key, last)])
        out += [ev for _, ev in events]
        stopped += s
    return out, stopped


def test_pieces_add_up_to_the_whole_decode_and_the_done_event_carries_it(tok):
    ids = tokens(tok)
    proc = OutputProcessor(tok)
    proc.add(7, stop=[], prompt_tokens=5)
    out, stopped = feed(proc, 7, ids, Event("7", "done", finish_reason="stop"))  # a stop token: no new token
    assert "".join(ev.text for ev in out if ev.kind == "token") == tok.decode(ids) == TEXT
    done = out[-1]
    assert (done.kind, done.text, done.finish_reason, done.step, done.prompt_tokens) == ("done", TEXT, "stop",
                                                                                          len(ids), 5)
    assert stopped == [] and 7 not in proc.states


def test_a_stop_string_is_never_sent_and_ends_the_request_that_the_engine_still_runs(tok):
    ids = tokens(tok)
    for stop in ("circle", "e at", "☕", "blue squ"):
        proc = OutputProcessor(tok)
        proc.add("k", stop=["never there", stop], prompt_tokens=3)
        out, stopped = feed(proc, "k", ids)  # the engine goes on until it hears of the stop: those pass as they are
        end = [ev.kind for ev in out].index("done")
        done, later = out[end], out[end + 1:]
        expected = TEXT[: TEXT.find(stop)]
        sent = "".join(ev.text for ev in out[:end])
        assert done.finish_reason == "stop" and done.text == expected, stop
        assert expected.startswith(sent) and stop not in sent, stop
        assert all(ev.kind == "token" and ev.text == "" for ev in later) and len(later) == len(ids) - end - 1
        # it ended on the token that completed the stop string
        assert done.step == end + 1, stop
        assert tok.decode(ids[: done.step]).find(stop) >= 0 > tok.decode(ids[: done.step - 1]).find(stop), stop
        assert stopped == ["k"] and "k" not in proc.states, stop


def test_the_engine_ending_on_a_token_that_completes_a_stop_string_is_a_stop_it_already_knows(tok):
    ids = tokens(tok, "the top left")
    proc = OutputProcessor(tok)
    proc.add(1, stop=["left"], prompt_tokens=2)
    out, stopped = feed(proc, 1, ids[:-1], Event("1", "done", token_ids=[ids[-1]], finish_reason="length"))
    assert (out[-1].finish_reason, out[-1].text) == ("stop", "the top ")
    assert stopped == []  # the engine ended it itself (its length): nothing to finish there
    proc.add(2, stop=[], prompt_tokens=2)
    out, _ = feed(proc, 2, ids[:-1], Event("2", "done", token_ids=[ids[-1]], finish_reason="length"))
    assert (out[-1].finish_reason, out[-1].text, out[-1].step) == ("length", "the top left", len(ids))


def test_what_is_not_a_text_request_passes_unchanged(tok):
    proc = OutputProcessor(tok)
    proc.add(1, stop=[], prompt_tokens=2)
    step, image_done = Event("img", "step", step=1, steps=3), Event("img", "done", images=[], finish_reason="stop")
    error = Event("1", "done", finish_reason="error", error="internal error: planted", error_type="server_error")
    out, stopped = proc.process([(9, step), (9, image_done), (1, error)])
    assert [ev for _, ev in out] == [step, image_done, error] and stopped == []
    assert proc.states == {}
