"""OpenAI-compatible routes, so the official `openai` client works unchanged:
/v1/chat/completions (text, or an image_url data URI plus text: caption / answer about the image),
/v1/completions (raw prompt, no template), /v1/images/generations, /v1/models."""

from __future__ import annotations

import asyncio
import time
from typing import Literal
from urllib.parse import urlparse

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from .routes import (APIError, _params, _server, _text_response, admit, chat_prompt, final, image_result, sse_response,
                     start)
from .schemas import MAX_IMAGE_BYTES, SamplingFields, _Request, decode_image, image_from_base64

router = APIRouter()


class ImageURL(BaseModel):
    url: str


class ContentPart(BaseModel):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None


class OAIMessage(BaseModel):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[ContentPart]


class StreamOptions(BaseModel):
    include_usage: bool = False


class OAISampling(SamplingFields):
    model: str | None = None
    user: str | None = None  # OpenAI's end-user id: accepted, not used
    n: int = Field(default=1, ge=1, le=1)  # one choice per request
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)  # OpenAI's default
    max_completion_tokens: int | None = Field(default=None, ge=1, le=8192)
    stream_options: StreamOptions | None = None


class OAIChatRequest(OAISampling):
    messages: list[OAIMessage] = Field(min_length=1, max_length=512)


class OAICompletionRequest(OAISampling):
    prompt: str = Field(min_length=1, max_length=100_000)
    max_tokens: int = Field(default=16, ge=1, le=8192)  # OpenAI's default for completions


class OAIImageRequest(_Request):
    prompt: str = Field(min_length=1, max_length=10_000)
    model: str | None = None
    user: str | None = None
    n: int = Field(default=1, ge=1, le=8)
    size: str | None = Field(default=None, pattern=r"^\d{1,5}x\d{1,5}$")
    response_format: Literal["b64_json"] = "b64_json"
    output_format: Literal["png"] = "png"
    negative_prompt: str = Field(default="", max_length=10_000)
    num_inference_steps: int | None = Field(default=None, ge=1, le=200)
    guidance_scale: float | None = Field(default=None, ge=0.0, le=50.0)
    seed: int | None = Field(default=None, ge=0, lt=2**31)
    stream: bool = False
    partial_images: int = Field(default=0, ge=0, le=3)


async def _fetch_image(url: str, allowed: list[str]):
    """An http(s) image URL, fetched only from the allowed domains (and their subdomains)."""
    import httpx

    host = (urlparse(url).hostname or "").lower()
    allowed = [d.strip().lower() for d in allowed if d.strip()]
    if not any(host == d or host.endswith("." + d) for d in allowed):
        raise APIError(400, f"image URLs from {host or url!r} are not allowed; send a data: URI, or start the "
                            "server with --allowed-image-domains", param="messages")
    try:
        async with httpx.AsyncClient(timeout=10.0, follow_redirects=False) as client:
            async with client.stream("GET", url) as r:
                if r.status_code != 200:
                    raise APIError(400, f"fetching the image gave HTTP {r.status_code}", param="messages")
                data = b""
                async for chunk in r.aiter_bytes():
                    data += chunk
                    if len(data) > MAX_IMAGE_BYTES:
                        raise APIError(400, f"image larger than {MAX_IMAGE_BYTES} bytes", param="messages")
    except (httpx.HTTPError, httpx.InvalidURL) as e:
        raise APIError(400, f"could not fetch the image ({type(e).__name__})", param="messages") from e
    return decode_image(data)


async def _split_image(messages: list[OAIMessage], allowed_domains: list[str]):
    """-> (plain messages, the image of the last user turn or None, that turn's text)."""
    plain, image, text = [], None, ""
    for m in messages:
        role = "system" if m.role == "developer" else m.role
        if isinstance(m.content, str):
            plain.append({"role": role, "content": m.content})
            continue
        texts = [p.text or "" for p in m.content if p.type == "text"]
        for part in m.content:
            if part.type == "image_url" and part.image_url is not None:
                url = part.image_url.url
                try:
                    if url.startswith(("http://", "https://")):
                        image = await _fetch_image(url, allowed_domains)
                    else:
                        image = image_from_base64(url)
                except ValueError as e:
                    raise APIError(400, str(e), param="messages") from e
                text = " ".join(texts)
        plain.append({"role": role, "content": " ".join(texts)})
    return plain, image, text


@router.post("/v1/chat/completions", dependencies=[Depends(admit)])
async def chat_completions(body: OAIChatRequest, request: Request):
    server = _server(request)
    if body.max_completion_tokens:
        body.max_tokens = body.max_completion_tokens
    messages, image, instruction = await _split_image(body.messages, server.config.allowed_image_domains)
    params = _params(body)
    if image is not None:
        def add(engine):
            return engine.add_caption(image, instruction, params)
    else:
        ids = chat_prompt(server.tokenizer, messages)

        def add(engine):
            return engine.add_text(ids, params)

    def shape(kind, **k):
        if kind == "id":
            return "chatcmpl"
        base = {"id": k["rid"], "created": k["created"], "model": body.model or server.model_name}
        if kind == "full":
            return base | {"object": "chat.completion", "usage": k["usage"], "choices": [
                {"index": 0, "message": {"role": "assistant", "content": k["text"]}, "finish_reason": k["finish"]}]}
        delta = {"content": k["text"]} if k["text"] is not None else {}
        return base | {"object": "chat.completion.chunk",
                       "choices": [{"index": 0, "delta": delta, "finish_reason": k["finish"]}]}

    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return await _text_response(request, add, body.stream, shape, include_usage)


@router.post("/v1/completions", dependencies=[Depends(admit)])
async def completions(body: OAICompletionRequest, request: Request):
    server = _server(request)
    ids = server.tokenizer(body.prompt).input_ids
    params = _params(body)

    def shape(kind, **k):
        if kind == "id":
            return "cmpl"
        base = {"id": k["rid"], "created": k["created"], "model": body.model or server.model_name,
                "object": "text_completion"}
        choice = {"index": 0, "text": k["text"] or "", "finish_reason": k["finish"], "logprobs": None}
        return base | {"choices": [choice]} | ({"usage": k["usage"]} if kind == "full" else {})

    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return await _text_response(request, lambda e: e.add_text(ids, params), body.stream, shape, include_usage)


@router.post("/v1/images/generations", dependencies=[Depends(admit)])
async def images_generations(body: OAIImageRequest, request: Request):
    server = _server(request)
    size = server.check_size(body.size)
    preview_every = 0
    if body.stream and body.partial_images:
        steps = body.num_inference_steps or server.default_steps
        preview_every = max(1, steps // (body.partial_images + 1))

    def add(engine):
        return engine.add_image(body.prompt, negative_prompt=body.negative_prompt, n=body.n, size=size,
                                steps=body.num_inference_steps, guidance_scale=body.guidance_scale, seed=body.seed,
                                preview_every=preview_every)

    events = await start(request, add)
    created = int(time.time())
    if not body.stream:
        return image_result(await final(request, events), created, body.prompt)

    async def stream():
        partial = 0
        async for ev in events:
            if ev.kind == "step" and ev.preview is not None and partial < body.partial_images:
                for b64 in await asyncio.to_thread(server.preview_b64, ev.preview):
                    yield {"type": "image_generation.partial_image", "b64_json": b64,
                           "partial_image_index": partial, "created_at": created}
                partial += 1
            elif ev.kind == "done":
                result = image_result(ev, created, body.prompt)
                for item in result["data"]:
                    yield {"type": "image_generation.completed", "b64_json": item["b64_json"],
                           "created_at": created, "usage": result["usage"]}

    return sse_response(stream())


@router.get("/v1/models")
async def models(request: Request):
    server = _server(request)
    return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": server.started,
                                        "owned_by": "xfusion-serve"}]}
