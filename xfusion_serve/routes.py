"""The HTTP routes: validated request -> engine queue -> events -> response (JSON, or server-sent events)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from PIL import Image
from pydantic import ValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from .async_engine import EngineFailed
from .engine import Engine, Event
from .sampling import SamplingParams
from .schemas import (CaptionRequest, ChatRequest, ImageRequest, SamplingFields, decode_image, image_from_base64,
                      image_to_base64)

router = APIRouter()


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 headers: dict | None = None):
        self.status, self.message, self.type, self.param, self.headers = status, message, type_, param, headers


def error_response(err: APIError) -> JSONResponse:
    body = {"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.status}}
    return JSONResponse(body, status_code=err.status, headers=err.headers)


def _server(request: Request):
    return request.app.state.server


def _params(req: SamplingFields) -> SamplingParams:
    return SamplingParams(max_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                          seed=req.seed, stop=req.stop, stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos)


def chat_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """The tokenizer's chat template when it has one; otherwise "role: content" lines, then "assistant:"."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    return tokenizer(text).input_ids


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
    server = _server(request)
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
        _server(request).admitting -= 1


async def start(request: Request, add) -> AsyncIterator[Event]:
    """Queues a request; whatever refuses it before its first event becomes an HTTP error.
    -> an iterator over all of its events."""
    server = _server(request)
    _give_back_place(request)
    # No await from here to the queue: the check and the queueing are one step for the event loop.
    _refuse_when_full(server, server.admitting)
    stream = server.engine.submit(add)
    try:
        first = await anext(stream)
    except ValueError as e:  # the engine refused the input (a size it was not trained on, ...)
        raise APIError(400, str(e)) from e
    except EngineFailed as e:
        raise APIError(503, f"the engine has failed ({e}); the server needs a restart", "service_unavailable") from e
    if first.kind == "done" and first.finish_reason == "error":
        raise _done_error(first)

    async def events():
        yield first
        async for ev in stream:
            yield ev

    return events()


async def final(request: Request, events: AsyncIterator[Event]) -> Event:
    """The done event. A client that leaves first cancels the request, freeing its cache at once
    (Starlette does not cancel a handler whose client went away)."""

    async def collect() -> Event:
        done = None
        async for ev in events:
            done = ev if ev.kind == "done" else done
        return done

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, watcher = asyncio.ensure_future(collect()), asyncio.ensure_future(disconnected())
    await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    watcher.cancel()
    if not task.done():
        task.cancel()  # CancelledError reaches AsyncEngine.submit, whose `finally` cancels the request
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise APIError(499, "the client closed the request", "client_closed_request")
    done = task.result()
    if done.finish_reason == "error":
        raise _done_error(done)
    return done


def _done_error(done: Event) -> APIError:
    if done.error_type == "invalid_request_error":
        return APIError(400, done.error or "invalid request")
    return APIError(500, done.error or "generation failed", "server_error")


def _error_event(err: APIError) -> str:
    return _sse({"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.status}})


def image_result(done: Event, created: int, prompt: str) -> dict:
    """An image request's done event -> OpenAI's images response (each image with the seed that made it)."""
    if done.finish_reason == "error":
        raise _done_error(done)
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


def _usage(done: Event) -> dict:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.step,
            "total_tokens": done.prompt_tokens + done.step}


async def _text_response(request: Request, add, stream: bool, shape, include_usage: bool = False) -> object:
    """Chat and caption: one response with the whole answer, or server-sent events as it is written."""
    events = await start(request, add)
    rid, created = f"{shape('id')}-{uuid.uuid4().hex[:12]}", int(time.time())
    if not stream:
        done = await final(request, events)
        return shape("full", rid=rid, created=created, text=done.text, finish=done.finish_reason, usage=_usage(done))

    async def chunks():
        sent = ""
        async for ev in events:
            if ev.kind == "token" and ev.text:
                sent += ev.text
                yield shape("chunk", rid=rid, created=created, text=ev.text, finish=None)
            elif ev.kind == "done":
                if ev.finish_reason == "error":
                    raise _done_error(ev)
                yield shape("chunk", rid=rid, created=created, text=ev.text[len(sent):], finish=ev.finish_reason)
                if include_usage:  # OpenAI's stream_options.include_usage: one last chunk, no choices
                    yield shape("chunk", rid=rid, created=created, text="", finish=None) | {"choices": [],
                                                                                         "usage": _usage(ev)}

    return sse_response(chunks())


@router.post("/v1/chat", dependencies=[Depends(admit)])
async def chat(body: ChatRequest, request: Request):
    server = _server(request)
    ids = chat_prompt(server.tokenizer, [m.model_dump() for m in body.messages])
    params = _params(body)

    def shape(kind, **k):
        if kind == "id":
            return "chatcmpl"
        if kind == "full":
            return {"id": k["rid"], "object": "chat.completion", "created": k["created"], "model": server.model_name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": k["text"]},
                                 "finish_reason": k["finish"]}], "usage": k["usage"]}
        return {"id": k["rid"], "object": "chat.completion.chunk", "created": k["created"],
                "model": server.model_name,
                "choices": [{"index": 0, "delta": {"content": k["text"]}, "finish_reason": k["finish"]}]}

    return await _text_response(request, lambda e: e.add_text(ids, params), body.stream, shape)


async def _caption_body(request: Request) -> tuple[CaptionRequest, Image.Image]:
    """JSON with a base64 image, or a multipart upload (an `image` file plus the same fields as form fields)."""
    try:
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            form = await request.form()
            upload = form.get("image")
            if upload is None or isinstance(upload, str):
                raise APIError(422, "image: a multipart caption request needs an `image` file", param="image")
            data = await upload.read()
            body = CaptionRequest.model_validate({k: v for k, v in form.items() if k != "image"} | {"image": ""})
            return body, decode_image(data)
        try:
            raw = json.loads(await request.body())
        except (ValueError, RecursionError) as e:  # not JSON, not UTF-8, nested too deep
            raise APIError(400, f"the body could not be parsed as JSON ({type(e).__name__})") from e
        body = CaptionRequest.model_validate(raw)
        return body, image_from_base64(body.image)
    except ValidationError as e:  # located as FastAPI locates body fields, so `param` names the field
        raise RequestValidationError([{**err, "loc": ("body", *err["loc"])} for err in e.errors()]) from e
    except ValueError as e:
        raise APIError(400, str(e), param="image") from e


# The body is read by hand (JSON or multipart); the schema still tells clients and fuzzers what it takes.
_CAPTION_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": CaptionRequest.model_json_schema()},
    "multipart/form-data": {"schema": {**CaptionRequest.model_json_schema(),
                                       "properties": {**CaptionRequest.model_json_schema()["properties"],
                                                      "image": {"type": "string", "format": "binary"}}}}}}}


@router.post("/v1/caption", dependencies=[Depends(admit)], openapi_extra=_CAPTION_BODY)
async def caption(request: Request):
    server = _server(request)
    body, image = await _caption_body(request)
    params = _params(body)

    def add(engine: Engine) -> str:
        return engine.add_caption(image, body.prompt, params)

    def shape(kind, **k):
        if kind == "id":
            return "cap"
        if kind == "full":
            return {"id": k["rid"], "object": "caption", "created": k["created"], "model": server.model_name,
                    "caption": k["text"], "finish_reason": k["finish"], "usage": k["usage"]}
        return {"id": k["rid"], "object": "caption.chunk", "created": k["created"], "model": server.model_name,
                "delta": k["text"], "finish_reason": k["finish"]}

    return await _text_response(request, add, body.stream, shape)


@router.post("/v1/generate-image", dependencies=[Depends(admit)])
async def generate_image(body: ImageRequest, request: Request):
    server = _server(request)
    size = server.check_size(body.size)

    def add(engine: Engine) -> str:
        return engine.add_image(body.prompt, negative_prompt=body.negative_prompt, n=body.n, size=size,
                                steps=body.steps, guidance_scale=body.guidance_scale, seed=body.seed,
                                preview_every=body.preview_every)

    events = await start(request, add)
    created = int(time.time())
    if not body.stream:
        return image_result(await final(request, events), created, body.prompt)

    async def steps():
        async for ev in events:
            if ev.kind == "step":
                step = {"type": "step", "step": ev.step, "steps": ev.steps}
                if ev.preview is not None:  # the current x0 prediction, decoded off the event loop
                    step["images"] = await asyncio.to_thread(server.preview_b64, ev.preview)
                yield step
            elif ev.kind == "done":
                yield {"type": "completed"} | image_result(ev, created, body.prompt)

    return sse_response(steps())


@router.get("/metrics")
async def metrics(request: Request):
    from prometheus_client import CONTENT_TYPE_LATEST

    return Response(_server(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/health")
async def health(request: Request):
    """Liveness: fails only when the engine has stopped for good (loading and draining are alive)."""
    engine = _server(request).engine
    if engine is not None and engine.failure:
        return JSONResponse({"status": "failed", "error": engine.failure}, status_code=503)
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request):
    server = _server(request)
    if not server.ready or not server.engine.alive:
        return JSONResponse({"status": "loading"}, status_code=503)
    return {"status": "ready", "model": server.model_name}
