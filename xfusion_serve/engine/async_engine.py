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
from functools import partial

from .engine import Engine
from .request import Event
from .streams import (EngineFailed, RequestStream, StepObserver, _set_exception, _set_result, _Submit, deliver,
                      events_of, notify, observed_finish, observed_step, one_request)

log = logging.getLogger(__name__)


class AsyncEngine:
    def __init__(self, engine: Engine, metrics: StepObserver | None = None):
        self.engine, self.metrics = engine, metrics
        self._inbox: queue.Queue = queue.Queue()  # lists of _Submit: the requests of one HTTP request
        self._queued = 0  # requests in the inbox or being added: waiting, for admission
        self._queued_lock = threading.Lock()
        self._cancels: queue.Queue = queue.Queue()
        self._calls: queue.Queue = queue.Queue()  # (fn, loop, future): call()s, run between two steps
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
        with self._failing:
            self.running = False
            self._fail_calls("the engine has stopped")

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
        """fn(engine, observer) run on the engine thread between two steps -> its result, as EngineProcess.call
        runs it in the engine process: what reads the engine's state (the metrics) never sees it mid-step, and
        the caller's event loop waits without blocking. Raises what fn raises; EngineFailed once the engine has
        failed or stopped."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        with self._failing:
            if self.failure or not self.running:
                raise EngineFailed(self.failure or "the engine is not running")
            self._calls.put((fn, loop, fut))
        return await fut

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
        while not self._calls.empty():
            fn, loop, fut = self._calls.get_nowait()
            try:
                result = fn(self.engine, self.metrics)
            except Exception as e:  # noqa: BLE001 - the caller's to see; the engine is untouched
                notify(loop, _set_exception, fut, e)
            else:
                notify(loop, _set_result, fut, result)
        if not self.engine.has_work():
            time.sleep(0.002)
            return
        events = observed_step(self.engine, self.metrics, self.engine.step)
        deliver(self._streams, [(ev.request_id, ev) for ev in events])

    def _fail_all(self, message: str) -> None:
        """The engine is gone: every request streaming or still in the inbox ends with an error, every call
        waiting too."""
        self.running = False
        self._fail_calls(message)
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

    def _fail_calls(self, message: str) -> None:
        while True:
            try:
                _, loop, fut = self._calls.get_nowait()
            except queue.Empty:
                return
            notify(loop, _set_exception, fut, EngineFailed(message))

    @property
    def alive(self) -> bool:
        return self.running and self._thread.is_alive()
