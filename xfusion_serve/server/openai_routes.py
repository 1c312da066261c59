"""OpenAI-compatible routes, so the official `openai` client works unchanged:
/v1/chat/completions (text, or an image_url data URI plus text: caption / answer about the image),
/v1/completions (raw prompt, no template), /v1/images/generations, /v1/models."""

from __future__ import annotations

import asyncio
import time
from urllib.parse import urlparse

from fastapi import APIRouter, Depends, Request

from ..model.prompts import chat_prompt
from .openai_schemas import OAIChatRequest, OAICompletionRequest, OAIImageRequest, OAIMessage
from .schemas import MAX_IMAGE_BYTES, decode_image, image_from_base64
from .serving import (APIError, admit, final, image_result, sampling_params, server_of, sse_response, start,
                      text_response)

router = APIRouter()


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
    server = server_of(request)
    if body.max_completion_tokens:
        body.max_tokens = body.max_completion_tokens
    messages, image, instruction = await _split_image(body.messages, server.config.allowed_image_domains)
    params = sampling_params(body)
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
    return await text_response(request, add, body.stream, shape, include_usage)


@router.post("/v1/completions", dependencies=[Depends(admit)])
async def completions(body: OAICompletionRequest, request: Request):
    server = server_of(request)
    ids = server.tokenizer(body.prompt).input_ids
    params = sampling_params(body)

    def shape(kind, **k):
        if kind == "id":
            return "cmpl"
        base = {"id": k["rid"], "created": k["created"], "model": body.model or server.model_name,
                "object": "text_completion"}
        choice = {"index": 0, "text": k["text"] or "", "finish_reason": k["finish"], "logprobs": None}
        return base | {"choices": [choice]} | ({"usage": k["usage"]} if kind == "full" else {})

    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return await text_response(request, lambda e: e.add_text(ids, params), body.stream, shape, include_usage)


@router.post("/v1/images/generations", dependencies=[Depends(admit)])
async def images_generations(body: OAIImageRequest, request: Request):
    server = server_of(request)
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
    server = server_of(request)
    return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": server.started,
                                        "owned_by": "xfusion-serve"}]}
