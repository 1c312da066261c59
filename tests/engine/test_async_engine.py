"""The async engine: a consumer that falls behind gets the tokens waiting for it as one event, nothing lost."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from functools import partial

import pytest
from test_engine import make_engine

from xfusion_serve import Engine, SamplingParams
from xfusion_serve.engine.async_engine import AsyncEngine, EngineFailed

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


def test_queued_requests_count_as_waiting_before_the_caller_awaits(random_checkpoint_dir):
    """Admission reads load() right after queueing (server/serving.py start_all): the requests of one HTTP
    request are in the count when submit_all returns, not once the caller's event loop runs again (a burst
    could otherwise slip in between and get more requests admitted than the queue has places)."""
    engine = AsyncEngine(make_engine(random_checkpoint_dir))
    gate = threading.Event()
    engine.engine.fault_hook = lambda phase, reqs: gate.wait(30) if phase == "schedule" else None
    engine.start()
    params = SamplingParams(max_tokens=4, ignore_eos=True)

    async def scenario():
        streams = engine.submit_all([partial(Engine.add_text, prompt=PROMPT, params=params)] * 3)
        queued = engine.load()  # no await since the queueing
        gate.set()
        return queued, await asyncio.gather(*(last(s) for s in streams))

    async def last(stream):
        return [ev async for ev in stream][-1]

    try:
        queued, dones = asyncio.run(scenario())
    finally:
        engine.shutdown()
    assert queued[0] == 0 and queued[1] >= 3  # (briefly counted twice while being added: never fewer)
    assert [d.finish_reason for d in dones] == ["length"] * 3 and engine.load() == (0, 0)


def test_requests_left_before_their_events_are_read_are_cancelled(random_checkpoint_dir):
    """A stream closed before it was ever read (a caller cancelled between queueing and reading), and one
    whose reader was cancelled while its request was being added, free their requests: nothing runs on
    unread (each would decode 300 tokens, 20 ms a step)."""
    engine = AsyncEngine(make_engine(random_checkpoint_dir))
    engine.engine.fault_hook = lambda phase, reqs: time.sleep(0.02) if phase == "decode" else None
    engine.start()
    long = partial(Engine.add_text, prompt=PROMPT, params=SamplingParams(max_tokens=300, ignore_eos=True))

    async def scenario():
        never_read, left_early = engine.submit_all([long, long])
        await never_read.aclose()
        reading = asyncio.ensure_future(anext(left_early))
        await asyncio.sleep(0)  # the reader runs up to waiting for the add
        reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reading
        for _ in range(60):
            await asyncio.sleep(0.05)
            if not engine.engine.requests and engine.load() == (0, 0):
                return True
        return False

    try:
        assert asyncio.run(scenario())
    finally:
        engine.shutdown()


class PlantedExit(BaseException):
    """Not an Exception: what a bad add must never raise, and the loop must still survive for its callers."""


def add_then_exit(engine: Engine) -> str:
    raise PlantedExit("planted")


async def outcome(stream) -> str:
    """How a request's stream ended: its last event's finish reason, or "refused" (EngineFailed)."""
    try:
        return [ev async for ev in stream][-1].finish_reason
    except EngineFailed:
        return "refused"


def test_a_group_whose_add_escapes_ends_every_stream_of_it_with_an_error(random_checkpoint_dir):
    """A BaseException out of one add of a group fails the engine loop; the group's requests added before it,
    the one that raised and those after it all end (none left waiting), and new requests are refused."""
    engine = AsyncEngine(make_engine(random_checkpoint_dir))
    engine.start()
    ok = partial(Engine.add_text, prompt=PROMPT, params=SamplingParams(max_tokens=50, ignore_eos=True))

    async def scenario():
        streams = engine.submit_all([ok, add_then_exit, ok, ok])
        return await asyncio.wait_for(asyncio.gather(*(outcome(s) for s in streams)), 20)

    try:
        ends = asyncio.run(scenario())
    finally:
        engine.shutdown()
    assert ends == ["error", "refused", "refused", "refused"]
    assert "PlantedExit" in engine.failure
    assert engine.load() == (0, 0)  # nothing runs or waits on an engine that is gone


def test_calls_run_on_the_engine_thread_between_steps_and_fail_once_it_stops(random_checkpoint_dir):
    """call(fn) runs fn where the engine steps, never during a step (the metrics read the scheduler's queues so):
    its result or its error reach the caller while requests stream on; after shutdown a call is refused."""
    engine = AsyncEngine(make_engine(random_checkpoint_dir))
    stepping = threading.Event()
    step = engine.engine.step

    def marked_step():
        stepping.set()
        try:
            return step()
        finally:
            stepping.clear()

    engine.engine.step = marked_step
    engine.start()

    def where(e, observer):
        return threading.current_thread().name, stepping.is_set(), len(e.requests)

    def broken(e, observer):
        raise ValueError("a bad call")

    async def scenario():
        stream = engine.submit(partial(Engine.add_text, prompt=PROMPT,
                                       params=SamplingParams(max_tokens=200, ignore_eos=True)))
        await anext(stream)  # running now
        seen = [await engine.call(where) for _ in range(20)]
        with pytest.raises(ValueError, match="a bad call"):
            await engine.call(broken)
        seen.append(await engine.call(where))  # the engine serves on after a call that raised
        await stream.aclose()
        return seen

    try:
        seen = asyncio.run(asyncio.wait_for(scenario(), 30))
    finally:
        engine.shutdown()
    assert all(name == "xfusion-engine" and not in_step for name, in_step, _ in seen)
    assert all(running == 1 for _, _, running in seen)

    async def late():
        await asyncio.wait_for(engine.call(where), 5)  # refused at once, not left waiting

    with pytest.raises(EngineFailed):
        asyncio.run(late())
