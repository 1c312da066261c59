"""The engine in a process of its own, for the server (vLLM V1's EngineCore): the model, the scheduler and the
step loop live in a child process with its own interpreter and GIL; the API server's event loop, sockets and
JSON never wait for a step, nor a step for them. Same interface as AsyncEngine (the engine on a thread).

API process                                         engine process (spawned)
  submit_all(adds) -> ("add", keys, adds) -> sender thread -> pipe -> poll between steps: add(engine) each
  events <- call_soon_threadsafe <- text (OutputProcessor) <- reader thread <- pipe <- ("events", [(key, token)],
                                    a stop string: ("finish", key) -> pipe ->   [(key, Event)], load) per step

The engine process sends token ids; the reader thread makes their text (detokenizer.py's OutputProcessor, as
vLLM V1's front end does), so that the engine's core is spent on the model, and tells the engine to finish a
request whose text reached a stop string (the tokens it made meanwhile are dropped). A request is known by a
key the API process gives it; `add` is a picklable callable `add(engine) -> request
id` (a module-level function or `functools.partial` of one; a lambda is refused at submit). A step's events
come back as one message, with the scheduler's (running, waiting) for admission. A child that dies (a crash, a
failed step, the OOM killer) fails every request with an error and `failure` says why, as AsyncEngine does.
This file is the API process's side; engine/engine_core.py is the child's.
"""

from __future__ import annotations

import asyncio
import atexit
import itertools
import logging
import multiprocessing
import pickle
import queue
import threading
from collections.abc import AsyncIterator, Callable
from functools import partial
from multiprocessing.connection import wait

from .detokenizer import OutputProcessor
from .engine import Engine
from .engine_core import EngineSpec, engine_main
from .request import Event
from .streams import (EngineFailed, RequestStream, StepObserver, _set_exception, _set_result, _Submit, deliver,
                      events_of, notify, one_request)

log = logging.getLogger(__name__)


class EngineProcess:
    def __init__(self, spec: EngineSpec, start_timeout: float = 1800.0, tokenizer=None):
        """`tokenizer`: the checkpoint's (loaded from it at start when not given), for the events' text."""
        self.spec, self.start_timeout, self._tokenizer = spec, start_timeout, tokenizer
        self.running = False
        self.failure: str | None = None
        self._keys = itertools.count()
        self._streams: dict[int, _Submit] = {}  # submitted and not done
        self._unacked: set[int] = set()  # sent, not yet added by the engine: they count as waiting
        self._calls: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._load = (0, 0)  # (running, waiting) as the engine last reported
        self._stopping = False  # shutdown() asked the engine process to end
        self._failing = threading.Lock()  # a request is either refused or registered before the streams fail
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()

    # ---- lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> None:
        """Spawns the engine process and returns once it has loaded, warmed up and can take requests. Raises
        EngineFailed with the child's error when it cannot start."""
        ctx = multiprocessing.get_context("spawn")  # CUDA and threads survive spawn, not fork
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=engine_main, args=(child, self.spec), name="xfusion-engine", daemon=True)
        self._proc.start()
        child.close()
        if not wait([self._conn, self._proc.sentinel], self.start_timeout) or not self._conn.poll():
            self._proc.kill()
            raise EngineFailed(f"the engine process did not start (exit code {self._proc.exitcode})")
        kind, detail = pickle.loads(self._conn.recv_bytes())
        if kind != "ready":
            self._proc.join(10)
            raise EngineFailed(f"the engine process failed to start: {detail}")
        if self._tokenizer is None:
            from ..model.checkpoint import load_checkpoint

            self._tokenizer = load_checkpoint(self.spec.checkpoint, load_vae=False, load_weights=False).tokenizer
        self._outputs = OutputProcessor(self._tokenizer)  # the reader thread's alone
        self.running = True
        atexit.register(self.shutdown)  # an exit that skips the server's shutdown must not wait on the child
        threading.Thread(target=self._send_loop, name="xfusion-engine-send", daemon=True).start()
        threading.Thread(target=self._read_loop, name="xfusion-engine-read", daemon=True).start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stops the engine process (at once between two steps; killed after `timeout` seconds). Requests still
        running end with an error."""
        if not hasattr(self, "_proc"):
            return
        atexit.unregister(self.shutdown)
        self._stopping = True
        self._outbox.put(pickle.dumps(("stop",)))
        self._proc.join(timeout)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()
        self._outbox.put(None)
        self.running = False

    @property
    def alive(self) -> bool:
        return self.running and self._proc.is_alive()

    def load(self) -> tuple[int, int]:
        """(running, waiting) requests; those still on their way to the engine count as waiting; (0, 0) once the
        engine has failed, as AsyncEngine says: from the moment `failure` is set, before the reader thread has
        emptied its books (a consumer woken by the failure may ask at once)."""
        if self.failure:
            return 0, 0
        running, waiting = self._load
        return running, waiting + len(self._unacked)

    # ---- requests ----------------------------------------------------------------------------------------
    def submit(self, add: Callable[[Engine], str]) -> AsyncIterator[Event]:
        """Adds a request (in the engine process, once iterated) and yields its events until its done event,
        as AsyncEngine.submit does. Raises TypeError for an `add` that cannot be pickled."""
        return one_request(lambda: self.submit_all([add])[0])

    def submit_all(self, adds: list[Callable[[Engine], str]]) -> list[RequestStream]:
        """Adds the requests of one HTTP request (its n choices) as one message: the engine process adds them
        together, between the same two steps, and what they share (a conversation and its pictures) crosses
        the pipe once and is encoded once. -> one RequestStream each. Raises TypeError for requests that cannot
        be pickled, EngineFailed after a failure."""
        loop, keys = asyncio.get_running_loop(), [next(self._keys) for _ in adds]
        try:  # unpickled apart from the message: a failure is these requests', not the engine's
            message = pickle.dumps(("add", keys, pickle.dumps(list(adds))))
        except (pickle.PicklingError, AttributeError, TypeError) as e:
            raise TypeError(f"a request for the engine process must be picklable (no lambda or local "
                            f"function): {e}") from e
        subs = [_Submit(add, asyncio.Queue(), loop, loop.create_future()) for add in adds]
        with self._failing:
            if self.failure:
                raise EngineFailed(self.failure)
            self._streams.update(zip(keys, subs))
            self._unacked.update(keys)
            self._outbox.put(message)
        return [RequestStream(self._events(key, sub), partial(self._cancel, key)) for key, sub in zip(keys, subs)]

    async def _events(self, key: int, sub: _Submit) -> AsyncIterator[Event]:
        try:
            await sub.ready  # raises what adding raised (bad input)
            async for ev in events_of(sub.events):
                yield ev
        finally:
            self._cancel(key)

    def _cancel(self, key: int) -> None:
        """Frees a request the consumer left before its end (after its add: the pipe keeps them in order)."""
        if self._streams.pop(key, None) is not None:
            self._outbox.put(pickle.dumps(("cancel", key)))

    async def call(self, fn: Callable[[Engine, StepObserver | None], object]) -> object:
        """fn(engine, observer) run in the engine process between two steps -> its (picklable) result; the
        server reads its metrics so."""
        loop, key = asyncio.get_running_loop(), next(self._keys)
        fut = loop.create_future()
        with self._failing:
            if self.failure:
                raise EngineFailed(self.failure)
            self._calls[key] = (loop, fut)
            self._outbox.put(pickle.dumps(("call", key, pickle.dumps(fn))))
        return await fut

    # ---- threads of the API process ----------------------------------------------------------------------
    def _send_loop(self) -> None:
        """Writes to the pipe, so that the event loop never blocks on a large request while a step runs."""
        while (data := self._outbox.get()) is not None:
            try:
                self._conn.send_bytes(data)
            except OSError:  # the engine is gone; the reader fails the requests
                return

    def _read_loop(self) -> None:
        try:
            while True:
                if self._conn not in wait([self._conn, self._proc.sentinel]):
                    break  # the process has ended with nothing more to say
                try:
                    message = pickle.loads(self._conn.recv_bytes())
                except (EOFError, OSError):
                    break
                if message[0] == "failed":
                    self._fail_all(message[1])
                    return
                self._dispatch(*message)
        except BaseException as e:  # noqa: BLE001 - no request may be left waiting on a reader that died
            log.exception("reading from the engine process failed")
            self._proc.kill()
            self._fail_all(f"reading from the engine process failed: {type(e).__name__}: {e}")
            return
        self._proc.join(10)
        code = self._proc.exitcode  # None if another thread (a shutdown) reaped it first
        self._fail_all("the engine process exited" + ("" if code is None else f" (exit code {code})"))

    def _dispatch(self, kind: str, *args) -> None:
        if kind == "events":
            tokens, others, self._load = args
            batch = [(key, Event(str(key), "token", token_ids=[token])) for key, token in tokens] + others
            batch, stopped = self._outputs.process(batch)
            deliver(self._streams, batch)  # it drops what comes for a stream that has ended
            for key in stopped:  # the engine finishes them; their requests are done here already
                self._outbox.put(pickle.dumps(("finish", key)))
        elif kind == "added":
            key, error, self._load, text = args
            self._unacked.discard(key)
            if text is not None:
                self._outputs.add(key, *text)
            sub = self._streams.get(key) if error is None else self._streams.pop(key, None)
            if sub is not None:
                notify(sub.loop, *((_set_result, sub.ready, key) if error is None
                                    else (_set_exception, sub.ready, error)))
        elif kind == "result":
            key, value, error = args
            if (waiting := self._calls.pop(key, None)) is not None:
                loop, fut = waiting
                notify(loop, *((_set_result, fut, value) if error is None else (_set_exception, fut, error)))
        elif kind == "ended":  # a cancel or finish handled
            key, self._load = args
            self._outputs.drop(key)

    def _fail_all(self, message: str) -> None:
        with self._failing:
            self.failure, self.running = message, False
        if self._stopping:
            message = self.failure = "the engine process has been stopped"
        else:
            log.error("engine process failed: %s", message)
        for key, sub in list(self._streams.items()):
            # Both, in this order: a consumer still waiting for its request to be added gets the exception; one
            # whose add was acknowledged (even by a callback not run yet) gets the done event.
            notify(sub.loop, _set_exception, sub.ready, EngineFailed(message))
            notify(sub.loop, sub.events.put_nowait, Event(
                str(key), "done", finish_reason="error", error=f"internal error: {message}",
                error_type="server_error"))
        self._streams.clear()
        self._outputs.states.clear()
        self._unacked.clear()
        self._load = (0, 0)  # nothing runs or waits on an engine that is gone
        for loop, fut in self._calls.values():
            notify(loop, _set_exception, fut, EngineFailed(message))
        self._calls.clear()
        self._outbox.put(None)
