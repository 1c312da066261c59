"""The engine process's side of engine/engine_process.py (vLLM V1's EngineCore): it builds the engine, says it
is ready, then loops: every message waiting on the pipe (add, cancel, finish, call, stop), one step, that step's
events as one message. The events carry token ids: the API process makes their text (an OutputProcessor) and
sends "finish" for a request whose text reached a stop string. Requests (the choices of one HTTP request
together) and calls arrive pickled inside the message, so that one that cannot be read fails alone; a step
that raises ends the process after saying why; a closed pipe (the API process gone) ends it quietly."""

from __future__ import annotations

import logging
import os
import pickle
import signal
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection

from .config import EngineConfig
from .engine import Engine
from .request import TextRequest
from .streams import StepObserver, observed_finish, observed_step

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineSpec:
    """What the engine process builds: `Engine.from_checkpoint(checkpoint, config)` computing on `threads` torch
    threads (None: torch's default) and, with `cores`, on those CPU cores alone (os.sched_setaffinity; None:
    wherever the OS puts it), warmed up, observed by `observer()` (a picklable factory: a class)."""

    checkpoint: str
    config: EngineConfig
    threads: int | None = None
    observer: Callable[[], StepObserver] | None = None
    cores: tuple[int, ...] | None = None


def engine_main(conn: Connection, spec: EngineSpec) -> None:
    """The child's whole life: build, warm up, say ready, then step and answer until told to stop or until
    the API process is gone (the pipe closes)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     [engine] %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the API process drains and then stops this one
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        import torch

        if spec.cores is not None:  # before torch starts its thread pool, whose threads inherit it
            os.sched_setaffinity(0, spec.cores)
            log.info("the engine computes on CPU cores %s", ",".join(map(str, spec.cores)))
        if spec.threads is not None:
            torch.set_num_threads(spec.threads)
        engine = Engine.from_checkpoint(spec.checkpoint, spec.config)
        engine.warm_up()
        engine.capture_graphs()
        observer = spec.observer() if spec.observer is not None else None
    except BaseException as e:  # noqa: BLE001 - the API process must hear why
        log.exception("the engine could not start")
        _send(conn, ("failed", f"{type(e).__name__}: {e}"))
        return
    try:
        _send(conn, ("ready", None))
        _Core(engine, observer, conn).run()
    except _ParentGone:
        return
    except BaseException as e:  # noqa: BLE001 - a failed step: the engine's state can no longer be trusted
        log.exception("engine loop failed; the engine stops")
        try:
            _send(conn, ("failed", f"{type(e).__name__}: {e}"))
        except _ParentGone:
            pass


class _ParentGone(Exception):
    """The pipe to the API process is closed: it has exited (or been killed); so does this process."""


def _send(conn: Connection, message: tuple) -> None:
    data = pickle.dumps(message)
    try:
        conn.send_bytes(data)
    except OSError as e:
        raise _ParentGone from e


def _recv(conn: Connection, timeout: float | None) -> tuple | None:
    """The next message, once one comes within `timeout` seconds (None: blocks); None if none came."""
    try:
        if not conn.poll(timeout):
            return None
        return pickle.loads(conn.recv_bytes())  # tuples of str, int and bytes: requests are unpickled apart
    except (EOFError, OSError) as e:
        raise _ParentGone from e


class _Core:
    """The child's loop: between two steps, every waiting message (adds, cancels, calls); a step; its events
    as one message. It blocks on the pipe while there is no work."""

    def __init__(self, engine: Engine, observer: StepObserver | None, conn: Connection):
        self.engine, self.observer, self.conn = engine, observer, conn
        self.ids: dict[int, str] = {}  # key -> request id, for live requests
        self.keys: dict[str, int] = {}  # request id -> key

    def run(self) -> None:
        while True:
            message = _recv(self.conn, 0 if self.engine.has_work() else None)  # every waiting one, then a step
            if message is not None:
                if not self._handle(*message):
                    return
            elif self.engine.has_work():
                self._step()

    def _handle(self, kind: str, *args) -> bool:
        if kind == "stop":
            return False
        if kind == "add":  # the requests of one HTTP request, in one pickle: what they share is one object
            keys, adds = args
            try:
                adds = pickle.loads(adds)
            except Exception as e:  # noqa: BLE001 - requests that cannot be read are theirs to fail
                for key in keys:
                    _send(self.conn, ("added", key, _picklable(e), self.engine.scheduler.load(), None))
                return True
            for key, add in zip(keys, adds):
                try:
                    rid = add(self.engine)
                except Exception as e:  # noqa: BLE001 - bad input is its request's own
                    _send(self.conn, ("added", key, _picklable(e), self.engine.scheduler.load(), None))
                    continue
                self.ids[key], self.keys[rid] = rid, key
                req = self.engine.requests.get(rid)  # a text request's text is the API process's to make
                text = (req.params.stop, req.prompt_len) if isinstance(req, TextRequest) else None
                _send(self.conn, ("added", key, None, self.engine.scheduler.load(), text))
        elif kind in ("cancel", "finish"):  # finish: a stop string, found by the API process
            rid = self.ids.pop(args[0], None)
            if rid is not None:
                self.keys.pop(rid, None)
                reason = "cancelled" if kind == "cancel" else "stop"
                observed_finish(self.engine, self.observer, rid, reason)
                _send(self.conn, ("ended", args[0], self.engine.scheduler.load()))
        elif kind == "call":
            key, fn = args
            try:
                value = pickle.loads(fn)(self.engine, self.observer)
                pickle.dumps(value)  # a result that cannot cross the pipe is the caller's error
                reply = ("result", key, value, None)
            except Exception as e:  # noqa: BLE001 - the caller gets it
                reply = ("result", key, None, _picklable(e))
            _send(self.conn, reply)
        return True

    def _step(self) -> None:
        """One step; its events as one message: a plain token event (most of them) as a (key, token id) pair,
        a fifteenth of an Event's pickle, and the rest as (key, Event)."""
        events = observed_step(self.engine, self.observer, self.engine.step_tokens)
        tokens, others = [], []
        for ev in events:
            key = self.keys.get(ev.request_id)
            if key is None:
                continue
            if ev.kind == "token" and ev.logprobs is None and len(ev.token_ids) == 1:
                tokens.append((key, ev.token_ids[0]))
                continue
            if ev.preview is not None:  # sent from the CPU: unpickling it needs no device in the API process
                ev.preview = ev.preview.cpu()
            others.append((key, ev))
            if ev.kind == "done":
                del self.keys[ev.request_id], self.ids[key]
        _send(self.conn, ("events", tokens, others, self.engine.scheduler.load()))


def _picklable(e: Exception) -> Exception:
    """An exception that crosses the pipe: itself, or a RuntimeError with its message."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{type(e).__name__}: {e}")
