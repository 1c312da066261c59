"""The engine on a thread of its own, for the server: requests go in through a queue, events come back to
each request's asyncio queue. Cancelling (a client gone, a timeout) frees the request's blocks at the next
step boundary. A failing batch fails its own requests (the engine sees to that); an exception that escapes
a step means the engine's state can no longer be trusted: every request ends with an error, the loop stops
and `failure` says why, so /health fails and the orchestrator restarts the process instead of it hanging."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import partial
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


class AsyncEngine:
    def __init__(self, engine: Engine, metrics: StepObserver | None = None):
        self.engine, self.metrics = engine, metrics
        self._inbox: queue.Queue = queue.Queue()  # lists of _Submit: the requests of one HTTP request
        self._queued = 0  # requests in the inbox or being added: waiting, for admission
        self._queued_lock = threading.Lock()
        self._cancels: queue.Queue = queue.Queue()
        self._streams: dict[str, _Submit] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="xfusion-engine", daemon=True)
        self.running = False
        self.failure: str | None = None
        self._failing = threading.Lock()  # a request is either refused or queued before the inbox is emptied
        self._started = threading.Event()

    def start(self) -> None:
        """Starts the engine thread; returns once it can take requests (its CUDA graphs recorded)."""
        self.running = True
        self._thread.start()
        self._started.wait()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        self.running = False

    def load(self) -> tuple[int, int]:
        """(running, waiting) requests; (0, 0) once the engine has failed, as EngineProcess says."""
        if self.failure:
            return 0, 0
        running, waiting = self.engine.scheduler.load()
        return running, waiting + self._queued

    def submit(self, add: Callable[[Engine], str]) -> AsyncIterator[Event]:
        """Adds a request (on the engine thread, once iterated) and yields its events until its done event.
        Token events that queued up while the consumer was busy come as one (text, token ids and
        log-probabilities joined)."""
        return one_request(lambda: self.submit_all([add])[0])

    def submit_all(self, adds: list[Callable[[Engine], str]]) -> list[RequestStream]:
        """Queues the requests of one HTTP request (its n choices) at once, before this returns: the engine
        thread adds them together, between the same two steps, and `load()` counts them from now (admission
        reads it). -> one RequestStream each. Raises EngineFailed after a failure."""
        loop = asyncio.get_running_loop()
        subs = [_Submit(add, asyncio.Queue(), loop, loop.create_future()) for add in adds]
        with self._failing:
            if self.failure:
                raise EngineFailed(self.failure)
            with self._queued_lock:
                self._queued += len(subs)
            self._inbox.put(subs)
        return [RequestStream(self._events(sub), partial(self._cancels.put, sub)) for sub in subs]

    async def _events(self, sub: _Submit) -> AsyncIterator[Event]:
        finished = False
        try:
            await sub.ready  # raises what adding raised (bad input)
            async for ev in events_of(sub.events):
                yield ev
            finished = True
        finally:
            if not finished:  # the consumer left early (even before the add): the engine thread frees it
                self._cancels.put(sub)

    async def call(self, fn: Callable[[Engine, StepObserver | None], object]) -> object:
        """fn(engine, observer) -> its result, run here (on the caller's thread): for what may read the engine
        while it steps, such as rendering the metrics: fn must read the engine's state as it changes (Metrics.refresh
        copies the scheduler's queues first)."""
        return fn(self.engine, self.metrics)

    # ---- engine thread -----------------------------------------------------------------------------------
    def _drain_inbox(self) -> None:
        while True:
            try:
                subs = self._inbox.get_nowait()
            except queue.Empty:
                return
            for i, sub in enumerate(subs):
                try:
                    rid = sub.add(self.engine)
                except Exception as e:  # noqa: BLE001 - bad input is reported to its caller only
                    notify(sub.loop, _set_exception, sub.ready, e)
                except BaseException:  # the loop fails: _fail_all ends this group's rest with the inbox's
                    self._inbox.put(subs[i:])
                    raise
                else:
                    sub.rid = rid
                    if sub.cancelled:
                        observed_finish(self.engine, self.metrics, rid)
                    else:
                        self._streams[rid] = sub
                        notify(sub.loop, _set_result, sub.ready, rid)
                with self._queued_lock:  # counted until the scheduler counts it
                    self._queued -= 1

    def _loop(self) -> None:
        try:
            try:
                self.engine.capture_graphs()
            finally:
                self._started.set()
            while not self._stop.is_set():
                self._iteration()
        except BaseException as e:  # noqa: BLE001 - nothing may leave the clients waiting forever
            log.exception("engine loop failed; the engine stops")
            with self._failing:
                self.failure = f"{type(e).__name__}: {e}"
                self._fail_all(self.failure)

    def _iteration(self) -> None:
        self._drain_inbox()
        while not self._cancels.empty():
            sub = self._cancels.get_nowait()
            if sub.rid is None:
                sub.cancelled = True  # still in the inbox: cancelled as it is added
            elif self._streams.pop(sub.rid, None) is not None:
                observed_finish(self.engine, self.metrics, sub.rid)
        if not self.engine.has_work():
            time.sleep(0.002)
            return
        events = observed_step(self.engine, self.metrics, self.engine.step)
        deliver(self._streams, [(ev.request_id, ev) for ev in events])

    def _fail_all(self, message: str) -> None:
        """The engine is gone: every request streaming or still in the inbox ends with an error."""
        self.running = False
        for rid, sub in list(self._streams.items()):
            notify(sub.loop, sub.events.put_nowait, Event(rid, "done", finish_reason="error",
                                                          error=f"internal error: {message}", error_type="server_error"))
        self._streams.clear()
        while True:
            try:
                subs = self._inbox.get_nowait()
            except queue.Empty:
                return
            for sub in subs:
                with self._queued_lock:
                    self._queued -= 1
                notify(sub.loop, _set_exception, sub.ready, EngineFailed(message))

    @property
    def alive(self) -> bool:
        return self.running and self._thread.is_alive()


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
