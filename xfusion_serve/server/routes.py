"""The native routes (/v1/chat, /v1/caption, /v1/generate-image) and the probes (/health, /ready, /metrics)."""

from __future__ import annotations

import asyncio
import json
import time
from functools import partial

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from PIL import Image

from ..engine.engine import Engine
from .chat import chat_response
from .conversation import ImageOptions
from .schemas import CaptionRequest, ChatRequest, ImageRequest, decode_image, image_from_base64
from .serving import (APIError, admit, final, image_result, sampling_params, server_of, sse_response,
                      text_response, validate_body)
from .text_then_image import start_image_route

router = APIRouter()


@router.post("/v1/chat", dependencies=[Depends(admit)])
async def chat(body: ChatRequest, request: Request):
    """The whole conversation, pictures anywhere (OpenAI's image_url parts); a text or an image answer."""
    return await chat_response(request, body)


async def _caption_body(request: Request) -> tuple[CaptionRequest, Image.Image]:
    """JSON with a base64 image, or a multipart upload (an `image` file plus the same fields as form fields);
    the image decoded off the event loop."""
    try:
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            form = await request.form()
            upload = form.get("image")
            if upload is None or isinstance(upload, str):
                raise APIError(422, "image: a multipart caption request needs an `image` file", param="image")
            data = await upload.read()
            body = validate_body(CaptionRequest, {k: v for k, v in form.items() if k != "image"} | {"image": ""})
            return body, await asyncio.to_thread(decode_image, data)
        try:
            raw = json.loads(await request.body())
        except (ValueError, RecursionError) as e:  # not JSON, not UTF-8, nested too deep
            raise APIError(400, f"the body could not be parsed as JSON ({type(e).__name__})") from e
        body = validate_body(CaptionRequest, raw)
        return body, await asyncio.to_thread(image_from_base64, body.image)
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
    server = server_of(request)
    body, image = await _caption_body(request)
    params = sampling_params(body)

    add = partial(Engine.add_caption, image=image, instruction=body.prompt, params=params)

    def shape(kind, **k):
        if kind == "id":
            return "cap"
        if kind == "first":
            return None
        base = {"id": k["rid"], "created": k["created"], "model": server.model_name}
        if kind == "full":
            (c,) = k["choices"]
            return base | {"object": "caption", "caption": c["text"], "finish_reason": c["finish"],
                           "usage": k["usage"]}
        return base | {"object": "caption.chunk", "delta": k["text"], "finish_reason": k["finish"]}

    return await text_response(request, [add], body.stream, shape)


@router.post("/v1/generate-image", dependencies=[Depends(admit)])
async def generate_image(body: ImageRequest, request: Request):
    server = server_of(request)
    size = server.check_size(body.size)

    revised, events = await start_image_route(request, body.prompt, ImageOptions.of(body, size, body.preview_every))
    created = int(time.time())
    if not body.stream:
        return await asyncio.to_thread(image_result, await final(request, events), created, revised)

    async def steps():
        async for ev in events:
            if ev.kind == "step":
                step = {"type": "step", "step": ev.step, "steps": ev.steps}
                if ev.preview is not None:  # the current x0 prediction, decoded off the event loop
                    step["images"] = await asyncio.to_thread(server.preview_b64, ev.preview)
                yield step
            elif ev.kind == "done":
                yield {"type": "completed"} | await asyncio.to_thread(image_result, ev, created, revised)

    return sse_response(steps())


@router.get("/metrics")
async def metrics(request: Request):
    from prometheus_client import CONTENT_TYPE_LATEST

    return Response(await server_of(request).render_metrics(), media_type=CONTENT_TYPE_LATEST)


@router.get("/health")
async def health(request: Request):
    """Liveness: fails only when the engine has stopped for good (loading and draining are alive)."""
    engine = server_of(request).engine
    if engine is not None and engine.failure:
        return JSONResponse({"status": "failed", "error": engine.failure}, status_code=503)
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request):
    server = server_of(request)
    if not server.ready or not server.engine.alive:
        return JSONResponse({"status": "loading"}, status_code=503)
    return {"status": "ready", "model": server.model_name}
