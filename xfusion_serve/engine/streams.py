"""What the server's two engine front ends share (engine/async_engine.py: the engine on a thread;
engine/engine_process.py: in a process of its own): a request's stream of events, their delivery from the
thread that has them to the event loops that wait for them, and the observer (the metrics) around each step."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

from .engine import Engine
from .request import Event

log = logging.getLogger(__name__)


class StepObserver(Protocol):
    """What watches the engine from its thread (the server's Prometheus metrics): called after every step with
    the step's events (token ids; their text may be made elsewhere) and the requests they name as they were
    before it, and for every request ended with no event (`Engine.finish`: "cancelled", or "stop" for a stop
    string found by the API process)."""

    def observe(self, engine: Engine, events: list[Event], requests: dict[str, object]) -> None: ...

    def finished(self, req, reason: str) -> None: ...


class EngineFailed(RuntimeError):
    """The engine loop has stopped for good; the process should be restarted."""


@dataclass
class _Submit:
    add: Callable[[Engine], str]  # runs on the engine thread, returns the request id
    events: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    ready: asyncio.Future
    rid: str | None = None  # once added (set on the engine thread)
    cancelled: bool = False  # left by its consumer before it was added (engine thread)


class RequestStream:
    """One queued request's events until its done event: an async iterator over `events`, an async generator
    that cancels its request when left before the end. `aclose()` of a stream never read calls `cancel`
    instead (closing a generator that never ran runs none of its code): a caller cancelled between queueing
    and reading (server/serving.py start_all) leaves nothing running."""

    def __init__(self, events: AsyncIterator[Event], cancel: Callable[[], None]):
        self._events, self._cancel, self._started = events, cancel, False

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> Event:
        self._started = True  # here, not in __anext__'s caller: set once this coroutine runs
        return await anext(self._events)

    async def aclose(self) -> None:
        if self._started:
            await self._events.aclose()
        else:
            self._cancel()


async def one_request(submit: Callable[[], RequestStream]) -> AsyncIterator[Event]:
    """The events of the request `submit()` queues when this is first iterated; closing this closes its stream
    (and so cancels the request if it is not done)."""
    stream = submit()
    try:
        async for ev in stream:
            yield ev
    finally:
        await stream.aclose()


async def events_of(events: asyncio.Queue) -> AsyncIterator[Event]:
    """A request's events from its queue, until its done event. A consumer that fell behind gets the token
    events waiting for it as one (vLLM's stream interval, but only when behind): one chunk to serialise and
    send instead of several."""
    while True:
        ev = await events.get()
        while ev.kind == "token" and not events.empty():
            nxt = events.get_nowait()
            if nxt.kind != "token":
                yield ev
                ev = nxt
                break
            ev = ev.merged(nxt)
        yield ev
        if ev.kind == "done":
            return


def observed_step(engine: Engine, observer: StepObserver | None, step: Callable[[], list[Event]]) -> list[Event]:
    """One engine step (`engine.step`, or `engine.step_tokens` where text is made elsewhere) -> its events; the
    observer (the metrics) sees them with the requests as they were before it. An observer that fails is
    logged: metrics never stop the engine."""
    before = dict(engine.requests)
    events = step()
    if observer is not None:
        try:
            observer.observe(engine, events, before)
        except Exception:  # noqa: BLE001
            log.exception("metrics update failed")
    return events


def observed_finish(engine: Engine, observer: StepObserver | None, request_id: str,
                    reason: str = "cancelled") -> None:
    """Ends a request with no event (`Engine.finish`): "cancelled" frees one whose client left (the metrics count
    it aborted); "stop" one whose stop string the API process found. What goes wrong here is logged: the loop
    must outlive anything one request does."""
    try:
        req = engine.requests.get(request_id)
        engine.finish(request_id, reason)
        if observer is not None and req is not None:
            observer.finished(req, reason)
    except Exception:  # noqa: BLE001
        log.exception("ending %s (%s) failed", request_id, reason)


def deliver(streams: dict, events: list[tuple[object, Event]]) -> None:
    """A step's (key, event) pairs to the queues of the streams they name (`streams`: key -> _Submit); a done
    event ends its stream. One wake-up of each event loop per step, not one per event."""
    by_loop: dict[asyncio.AbstractEventLoop, list] = {}
    for key, ev in events:
        sub = streams.get(key)
        if sub is not None:
            by_loop.setdefault(sub.loop, []).append((sub.events, ev))
            if ev.kind == "done":
                streams.pop(key, None)
    for loop, batch in by_loop.items():
        notify(loop, _put_all, batch)


def notify(loop: asyncio.AbstractEventLoop, callback, *args) -> None:
    """callback(*args) on `loop`'s thread; nothing if that loop has closed (its caller gave up waiting): an
    answer nobody waits for must not stop the thread that gives it."""
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:  # "Event loop is closed"
        pass


def _put_all(batch: list[tuple[asyncio.Queue, Event]]) -> None:
    for events, ev in batch:
        events.put_nowait(ev)


def _set_result(fut: asyncio.Future, value) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
