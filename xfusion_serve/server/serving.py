"""What every inference route shares: a place in the engine's queue, the request's events from the engine,
and their answer as JSON or server-sent events; errors in OpenAI's body.

request -> admit (a queue place, before the body is read) -> start (queued on the engine; refusals become
HTTP errors) -> events -> final (JSON) or sse_response (streaming). A client that leaves cancels its request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError

from ..engine.streams import EngineFailed
from ..engine.request import Event
from ..engine.text_sampling import SamplingParams
from .schemas import SamplingFields, image_to_base64


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 headers: dict | None = None):
        self.status, self.message, self.type, self.param, self.headers = status, message, type_, param, headers


def error_response(err: APIError) -> JSONResponse:
    body = {"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.status}}
    return JSONResponse(body, status_code=err.status, headers=err.headers)


def validate_body(model, fields: dict):
    """A body read by hand (a multipart form) -> `model`; its errors located as FastAPI locates body fields (so
    the 422 names the field), as for a JSON body."""
    try:
        return model.model_validate(fields)
    except ValidationError as e:
        raise RequestValidationError([{**err, "loc": ("body", *err["loc"])} for err in e.errors()]) from e


def server_of(request: Request):
    """The ServerState (app.state.server) behind a request."""
    return request.app.state.server


def sampling_params(req: SamplingFields, choice: int = 0, logprobs: int | None = None) -> SamplingParams:
    """The engine's parameters for choice `choice` of a request (with a seed s, choice i samples with s + i)."""
    seed = None if req.seed is None else req.seed + choice
    return SamplingParams(max_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                          seed=seed, stop=req.stop, stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos,
                          logprobs=logprobs)


def _refuse_when_full(server, reserved: int) -> None:
    """503 while loading, draining or after an engine failure; 429 when the queue (with the places already
    promised to requests still being read) is full."""
    if not server.ready or not server.engine.alive:
        raise APIError(503, "the model is loading, the server is draining, or the engine has failed",
                       "service_unavailable", headers={"Retry-After": "5"})
    running, waiting = server.engine.load()
    if waiting + reserved >= server.config.max_queue:
        raise APIError(429, "the server is at its queue limit; retry later", "rate_limit_exceeded",
                       headers={"Retry-After": "1"})


async def admit(request: Request):
    """A dependency of every inference route: a place in the queue is promised before the body is decoded
    (a refused request costs no image decoding) and held until `start` queues the request or it fails."""
    server = server_of(request)
    _refuse_when_full(server, server.admitting)
    server.admitting += 1
    request.state.place = True
    try:
        yield
    finally:
        _give_back_place(request)


def _give_back_place(request: Request) -> None:
    if getattr(request.state, "place", False):
        request.state.place = False
        server_of(request).admitting -= 1


async def start(request: Request, add, *, admitted: bool = False) -> AsyncIterator[Event]:
    """Queues a request; whatever refuses it before its first event becomes an HTTP error.
    -> an iterator over all of its events. `admitted`: a later part of an HTTP request whose first part was
    admitted (an image after its text): the queue limit and a drain do not refuse it halfway."""
    return (await start_all(request, [add], admitted=admitted))[0]


def _engine_failed(e: EngineFailed) -> APIError:
    return APIError(503, f"the engine has failed ({e}); the server needs a restart", "service_unavailable")


async def start_all(request: Request, adds: list, *, admitted: bool = False) -> list[AsyncIterator[Event]]:
    """Queues every part of a request (its n choices) at once, so that they are prefilled together; if one is
    refused, the others are cancelled and the refusal becomes the HTTP error. -> one event iterator each."""
    server = server_of(request)
    _give_back_place(request)
    # No await from here to the queue: the check and the queueing are one step for the event loop.
    if not admitted:
        _refuse_when_full(server, server.admitting)
    try:
        streams = server.engine.submit_all(adds)
    except EngineFailed as e:
        raise _engine_failed(e) from e
    try:
        firsts = await asyncio.gather(*(anext(s) for s in streams), return_exceptions=True)
    except BaseException:  # cancelled (a shutdown): not one request may run on unread
        for s in streams:
            await s.aclose()
        raise
    refused = next((f for f in firsts if isinstance(f, BaseException) or (
        f.kind == "done" and f.finish_reason == "error")), None)
    if refused is not None:
        for s in streams:
            await s.aclose()  # cancels a request that was queued (engine/streams.py RequestStream)
        if isinstance(refused, ValueError):  # the engine refused the input (a size it was not trained on, ...)
            raise APIError(400, str(refused)) from refused
        if isinstance(refused, EngineFailed):
            raise _engine_failed(refused) from refused
        if isinstance(refused, BaseException):
            raise refused
        raise done_error(refused)

    async def events(first: Event, stream: AsyncIterator[Event]):
        try:
            yield first
            async for ev in stream:
                yield ev
        finally:
            await stream.aclose()

    return [events(f, s) for f, s in zip(firsts, streams)]


async def final(request: Request, events: AsyncIterator[Event]) -> Event:
    """The done event (see final_all)."""
    return (await final_all(request, [events]))[0]


async def final_all(request: Request, streams: list[AsyncIterator[Event]]) -> list[Event]:
    """Each request's done event, its `logprobs` those of its whole answer. A client that leaves first cancels
    the requests, freeing their cache at once (Starlette does not cancel a handler whose client went away)."""

    async def collect(events: AsyncIterator[Event]) -> Event:
        done, logprobs = None, []
        async for ev in events:
            logprobs += ev.logprobs or []
            done = ev if ev.kind == "done" else done
        done.logprobs = logprobs or None
        return done

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(asyncio.gather(*(collect(s) for s in streams)))
    watcher = asyncio.ensure_future(disconnected())
    await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    watcher.cancel()
    if not task.done():
        task.cancel()  # CancelledError reaches the engine's stream, whose `finally` cancels the request
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise APIError(499, "the client closed the request", "client_closed_request")
    dones = task.result()
    for done in dones:
        if done.finish_reason == "error":
            raise done_error(done)
    return dones


async def merged(streams: list[AsyncIterator[Event]]) -> AsyncIterator[tuple[int, Event]]:
    """The events of several requests as they come, each with its index; closing it cancels them all."""
    if len(streams) == 1:  # the common case: no task or queue between the engine and the response
        try:
            async for ev in streams[0]:
                yield 0, ev
        finally:
            await streams[0].aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, events: AsyncIterator[Event]) -> None:
        try:
            async for ev in events:
                await queue.put((i, ev))
        finally:
            await queue.put((i, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            i, ev = await queue.get()
            if ev is None:
                running -= 1
            else:
                yield i, ev
    finally:
        for t in tasks:
            t.cancel()


def done_error(done: Event) -> APIError:
    if done.error_type == "invalid_request_error":
        return APIError(400, done.error or "invalid request")
    return APIError(500, done.error or "generation failed", "server_error")


def _error_event(err: APIError) -> str:
    return _sse({"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.status}})


def image_result(done: Event, created: int, prompt: str) -> dict:
    """An image request's done event -> OpenAI's images response (each image with the seed that made it)."""
    if done.finish_reason == "error":
        raise done_error(done)
    return {"created": created, "usage": {"images": len(done.images)},
            "data": [{"b64_json": image_to_base64(im), "seed": s, "revised_prompt": prompt}
                     for im, s in zip(done.images, done.seeds)]}


def _sse(obj) -> str:
    return f"data: {json.dumps(obj) if not isinstance(obj, str) else obj}\n\n"


def sse_response(payloads: AsyncIterator[dict]) -> StreamingResponse:
    """Server-sent events, one per payload; a failure mid-stream becomes one error event; always [DONE]."""

    async def body():
        try:
            async for obj in payloads:
                yield _sse(obj)
        except APIError as e:
            yield _error_event(e)
        except Exception as e:  # noqa: BLE001 - the client gets an error event, not a cut connection
            yield _error_event(APIError(500, str(e), "server_error"))
        yield _sse("[DONE]")

    return StreamingResponse(body(), media_type="text/event-stream")


def _usage(dones: list[Event]) -> dict:
    prompt, completion = dones[0].prompt_tokens, sum(d.step for d in dones)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def text_response(request: Request, adds: list, stream: bool, shape, include_usage: bool = False) -> object:
    """Chat, completions and captions: `adds` queue one engine request per choice. One response with every
    answer, or server-sent events as they are written. `shape(kind, **k)` builds the route's bodies: "id" (the
    id's prefix), "full" (rid, created, choices [{index, text, finish, logprobs}], usage), "first" (the chunk
    that opens choice `index`, or None), "chunk" (index, text, finish, logprobs)."""
    streams = await start_all(request, adds)
    rid, created = f"{shape('id')}-{uuid.uuid4().hex[:12]}", int(time.time())
    if not stream:
        dones = await final_all(request, streams)
        choices = [{"index": i, "text": d.text, "finish": d.finish_reason, "logprobs": d.logprobs}
                   for i, d in enumerate(dones)]
        return shape("full", rid=rid, created=created, choices=choices, usage=_usage(dones))

    async def chunks():
        sent, dones = [""] * len(streams), {}
        for i in range(len(streams)):
            first = shape("first", rid=rid, created=created, index=i)
            if first is not None:
                yield first
        async with contextlib.aclosing(merged(streams)) as events:  # closed at once, not by the collector
            async for i, ev in events:
                if ev.kind == "token" and (ev.text or ev.logprobs):
                    sent[i] += ev.text
                    yield shape("chunk", rid=rid, created=created, index=i, text=ev.text, finish=None,
                                logprobs=ev.logprobs)
                elif ev.kind == "done":
                    if ev.finish_reason == "error":
                        raise done_error(ev)
                    dones[i] = ev
                    yield shape("chunk", rid=rid, created=created, index=i, text=ev.text[len(sent[i]):],
                                finish=ev.finish_reason, logprobs=ev.logprobs)
        if include_usage:  # OpenAI's stream_options.include_usage: one last chunk, no choices
            last = shape("chunk", rid=rid, created=created, index=0, text="", finish=None, logprobs=None)
            yield last | {"choices": [], "usage": _usage(list(dones.values()))}

    return sse_response(chunks())
