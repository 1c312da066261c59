"""The async engine: a consumer that falls behind gets the tokens waiting for it as one event, nothing lost."""

from __future__ import annotations

import asyncio

from test_engine import make_engine

from xfusion_serve import SamplingParams
from xfusion_serve.engine.async_engine import AsyncEngine

PROMPT = [2, 7, 9, 11]


def test_a_slow_consumer_gets_the_waiting_tokens_joined_and_loses_nothing(random_checkpoint_dir):
    params = SamplingParams(max_tokens=24, ignore_eos=True, logprobs=1)
    offline = make_engine(random_checkpoint_dir)
    offline.add_text(PROMPT, params)
    alone = []
    while offline.has_work():
        alone += offline.step()
    expected, done = [t for ev in alone for t in ev.token_ids], alone[-1]
    expected_text = "".join(ev.text for ev in alone if ev.kind == "token")
    engine = AsyncEngine(make_engine(random_checkpoint_dir))
    engine.start()

    async def consume(pause: float) -> list:
        events = []
        async for ev in engine.submit(lambda e: e.add_text(PROMPT, params)):
            events.append(ev)
            await asyncio.sleep(pause)  # the engine steps on meanwhile (a few ms a step here)
        return events

    try:
        slow, fast = asyncio.run(consume(0.1)), asyncio.run(consume(0.0))
    finally:
        engine.shutdown()
    for events in (slow, fast):
        tokens = [t for ev in events for t in ev.token_ids]
        streamed = "".join(ev.text for ev in events if ev.kind == "token")
        assert tokens == expected and len(tokens) == 24 and streamed == expected_text
        assert [lp.token for ev in events for lp in ev.logprobs or []] == tokens
        assert events[-1].kind == "done" and events[-1].text == done.text
    assert max(len(ev.token_ids) for ev in slow) > 1  # the slow one did fall behind


def test_a_steps_events_reach_their_streams_once_and_a_closed_loop_is_skipped():
    """deliver(), shared by the engine thread and the engine process's reader: each event to its own stream's
    queue, a done event ends the stream, and a stream whose event loop has closed (a client that gave up) is
    skipped instead of stopping the thread that delivers."""
    from xfusion_serve.engine.async_engine import _Submit, deliver
    from xfusion_serve.engine.request import Event

    live, gone = asyncio.new_event_loop(), asyncio.new_event_loop()
    gone.close()
    streams = {k: _Submit(None, asyncio.Queue(), loop, None) for k, loop in (("a", live), ("b", live), ("x", gone))}
    a, b = streams["a"], streams["b"]
    deliver(streams, [("a", Event("1", "token", text="hi")), ("b", Event("2", "done")), ("x", Event("3", "done")),
                      ("unknown", Event("4", "done"))])
    live.run_until_complete(asyncio.sleep(0))  # runs the delivery the loop was handed
    assert [a.events.get_nowait().text, b.events.get_nowait().kind] == ["hi", "done"]
    assert a.events.empty() and b.events.empty() and set(streams) == {"a"}  # done ones ended
    live.close()
