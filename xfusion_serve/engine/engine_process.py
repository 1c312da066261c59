"""The engine in a process of its own, for the server (vLLM V1's EngineCore): the model, the scheduler and the
step loop live in a child process with its own interpreter and GIL; the API server's event loop, sockets and
JSON never wait for a step, nor a step for them. Same interface as AsyncEngine (the engine on a thread).

API process                                         engine process (spawned)
  submit(add) -> pickled ("add", key, add) -> sender thread -> pipe -> poll between steps: add(engine)
  events      <- call_soon_threadsafe     <- reader thread  <- pipe <- ("events", [(key, Event)], load) per step

A request is known by a key the API process gives it; `add` is a picklable callable `add(engine) -> request
id` (a module-level function or `functools.partial` of one; a lambda is refused at submit). A step's events
come back as one message, with the scheduler's (running, waiting) for admission. A child that dies (a crash, a
failed step, the OOM killer) fails every request with an error and `failure` says why, as AsyncEngine does.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import pickle
import queue
import signal
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

from .async_engine import EngineFailed, StepObserver, _put_all, _set_exception, _set_result, _Submit, events_of
from .config import EngineConfig
from .engine import Engine
from .request import Event

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineSpec:
    """What the engine process builds: `Engine.from_checkpoint(checkpoint, config)` computing on `threads` torch
    threads (None: torch's default), warmed up, observed by `observer()` (a picklable factory: a class)."""

    checkpoint: str
    config: EngineConfig
    threads: int | None = None
    observer: Callable[[], StepObserver] | None = None


class EngineProcess:
    def __init__(self, spec: EngineSpec, start_timeout: float = 1800.0):
        self.spec, self.start_timeout = spec, start_timeout
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
        self._proc = ctx.Process(target=_engine_main, args=(child, self.spec), name="xfusion-engine", daemon=True)
        self._proc.start()
        child.close()
        if not wait([self._conn, self._proc.sentinel], self.start_timeout) or not self._conn.poll():
            self._proc.kill()
            raise EngineFailed(f"the engine process did not start (exit code {self._proc.exitcode})")
        kind, detail = pickle.loads(self._conn.recv_bytes())
        if kind != "ready":
            self._proc.join(10)
            raise EngineFailed(f"the engine process failed to start: {detail}")
        self.running = True
        threading.Thread(target=self._send_loop, name="xfusion-engine-send", daemon=True).start()
        threading.Thread(target=self._read_loop, name="xfusion-engine-read", daemon=True).start()

    def shutdown(self, timeout: float = 10.0) -> None:
        if not hasattr(self, "_proc"):
            return
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
        """(running, waiting) requests; those still on their way to the engine count as waiting."""
        running, waiting = self._load
        return running, waiting + len(self._unacked)

    # ---- requests ----------------------------------------------------------------------------------------
    async def submit(self, add: Callable[[Engine], str]) -> AsyncIterator[Event]:
        """Adds a request (in the engine process) and yields its events until its done event, as
        AsyncEngine.submit does. Raises TypeError for an `add` that cannot be pickled."""
        loop, key = asyncio.get_running_loop(), next(self._keys)
        try:
            message = pickle.dumps(("add", key, add))
        except (pickle.PicklingError, AttributeError, TypeError) as e:
            raise TypeError(f"a request for the engine process must be picklable (no lambda or local "
                            f"function): {e}") from e
        sub = _Submit(add, asyncio.Queue(), loop, loop.create_future())
        with self._failing:
            if self.failure:
                raise EngineFailed(self.failure)
            self._streams[key] = sub
            self._unacked.add(key)
            self._outbox.put(message)
        try:
            await sub.ready  # raises what adding raised (bad input)
            async for ev in events_of(sub.events):
                yield ev
        finally:
            if self._streams.pop(key, None) is not None:  # the consumer left early: free what it holds
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
            self._outbox.put(pickle.dumps(("call", key, fn)))
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
        while True:
            ready = wait([self._conn, self._proc.sentinel])
            if self._conn not in ready:  # the process has ended with nothing more to say
                self._proc.join()
                self._fail_all(f"the engine process exited (exit code {self._proc.exitcode})")
                return
            try:
                message = pickle.loads(self._conn.recv_bytes())
            except (EOFError, OSError):
                self._proc.join()
                self._fail_all(f"the engine process exited (exit code {self._proc.exitcode})")
                return
            if message[0] == "failed":
                self._fail_all(message[1])
                return
            self._dispatch(*message)

    def _dispatch(self, kind: str, *args) -> None:
        if kind == "events":
            batch, self._load = args
            by_loop: dict[asyncio.AbstractEventLoop, list] = {}
            for key, ev in batch:
                sub = self._streams.get(key)
                if sub is not None:
                    by_loop.setdefault(sub.loop, []).append((sub.events, ev))
                    if ev.kind == "done":
                        self._streams.pop(key, None)
            for loop, events in by_loop.items():  # one wake-up of the event loop per step
                loop.call_soon_threadsafe(_put_all, events)
        elif kind == "added":
            key, error, self._load = args
            self._unacked.discard(key)
            sub = self._streams.get(key) if error is None else self._streams.pop(key, None)
            if sub is not None:
                sub.loop.call_soon_threadsafe(*((_set_result, sub.ready, key) if error is None
                                                else (_set_exception, sub.ready, error)))
        elif kind == "result":
            key, value, error = args
            loop, fut = self._calls.pop(key)
            loop.call_soon_threadsafe(*((_set_result, fut, value) if error is None else (_set_exception, fut, error)))
        elif kind == "load":
            self._load = args[0]

    def _fail_all(self, message: str) -> None:
        with self._failing:
            self.failure, self.running = message, False
        if self._stopping:
            message = self.failure = "the engine process has been stopped"
        else:
            log.error("engine process failed: %s", message)
        for key, sub in list(self._streams.items()):
            if not sub.ready.done():
                sub.loop.call_soon_threadsafe(_set_exception, sub.ready, EngineFailed(message))
            else:
                sub.loop.call_soon_threadsafe(sub.events.put_nowait, Event(
                    str(key), "done", finish_reason="error", error=f"internal error: {message}",
                    error_type="server_error"))
        self._streams.clear()
        self._unacked.clear()
        for loop, fut in self._calls.values():
            loop.call_soon_threadsafe(_set_exception, fut, EngineFailed(message))
        self._calls.clear()
        self._outbox.put(None)


# ---- the engine process ----------------------------------------------------------------------------------
def _engine_main(conn: Connection, spec: EngineSpec) -> None:
    """The child's whole life: build, warm up, say ready, then step and answer until told to stop or until
    the API process is gone (the pipe closes)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     [engine] %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the API process drains and then stops this one
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        import torch

        if spec.threads is not None:
            torch.set_num_threads(spec.threads)
        engine = Engine.from_checkpoint(spec.checkpoint, spec.config)
        engine.warm_up()
        engine.capture_graphs()
        observer = spec.observer() if spec.observer is not None else None
        if observer is not None:
            observer.observe(engine, [], {})
    except BaseException as e:  # noqa: BLE001 - the API process must hear why
        log.exception("the engine could not start")
        _send(conn, ("failed", f"{type(e).__name__}: {e}"))
        return
    _send(conn, ("ready", None))
    core = _Core(engine, observer, conn)
    try:
        core.run()
    except (EOFError, OSError):
        return  # the API process is gone
    except BaseException as e:  # noqa: BLE001 - a failed step: the engine's state can no longer be trusted
        log.exception("engine loop failed; the engine stops")
        _send(conn, ("failed", f"{type(e).__name__}: {e}"))


def _send(conn: Connection, message: tuple) -> None:
    conn.send_bytes(pickle.dumps(message))


class _Core:
    """The child's loop: between two steps, every waiting message (adds, cancels, calls); a step; its events
    as one message. It blocks on the pipe while there is no work."""

    def __init__(self, engine: Engine, observer: StepObserver | None, conn: Connection):
        self.engine, self.observer, self.conn = engine, observer, conn
        self.ids: dict[int, str] = {}  # key -> request id, for live requests
        self.keys: dict[str, int] = {}  # request id -> key

    def run(self) -> None:
        while True:
            if self.conn.poll(0 if self.engine.has_work() else None):
                while True:
                    if not self._handle(*pickle.loads(self.conn.recv_bytes())):
                        return
                    if not self.conn.poll(0):
                        break
            if self.engine.has_work():
                self._step()

    def _load(self) -> tuple[int, int]:
        s = self.engine.scheduler
        return len(s.text) + len(s.images), len(s.waiting)

    def _handle(self, kind: str, *args) -> bool:
        if kind == "stop":
            return False
        if kind == "add":
            key, add = args
            try:
                rid = add(self.engine)
            except Exception as e:  # noqa: BLE001 - bad input is reported to its caller only
                _send(self.conn, ("added", key, _picklable(e), self._load()))
                return True
            self.ids[key], self.keys[rid] = rid, key
            _send(self.conn, ("added", key, None, self._load()))
        elif kind == "cancel":
            rid = self.ids.pop(args[0], None)
            if rid is not None:
                self.keys.pop(rid, None)
                req = self.engine.requests.get(rid)
                self.engine.cancel(rid)
                if self.observer is not None and req is not None:
                    self.observer.aborted(req)
                    self.observer.observe(self.engine, [], {})  # gauges must not wait for the next step
                _send(self.conn, ("load", self._load()))
        elif kind == "call":
            key, fn = args
            try:
                value, error = fn(self.engine, self.observer), None
            except Exception as e:  # noqa: BLE001 - the caller gets it
                value, error = None, _picklable(e)
            _send(self.conn, ("result", key, value, error))
        return True

    def _step(self) -> None:
        before = dict(self.engine.requests)
        events = self.engine.step()
        if self.observer is not None:
            try:
                self.observer.observe(self.engine, events, before)
            except Exception:  # noqa: BLE001
                log.exception("metrics update failed")
        batch = []
        for ev in events:
            key = self.keys.get(ev.request_id)
            if key is not None:
                if ev.preview is not None:  # the API process decodes previews on its CPU, never touching CUDA
                    ev.preview = ev.preview.cpu()
                batch.append((key, ev))
                if ev.kind == "done":
                    del self.keys[ev.request_id], self.ids[key]
        _send(self.conn, ("events", batch, self._load()))


def _picklable(e: Exception) -> Exception:
    """An exception that crosses the pipe: itself, or a RuntimeError with its message."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{type(e).__name__}: {e}")
