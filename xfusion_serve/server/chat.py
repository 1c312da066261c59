"""A chat turn, for /v1/chat/completions and /v1/chat alike: the whole conversation (pictures included) is the
prompt; the answer is text (n choices, log-probabilities) or, with `modalities: ["image"]`, images.

Images come back as OpenRouter-style gateways and SGLang-Omni give them: `message.content` stays a string and
`message.images` is [{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}]. Streamed, the
first chunk carries the role, then one chunk per denoising step (`progress`), then `delta.images`.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from functools import partial

from fastapi import Request

from .conversation import ImageOptions, add_conversation, read_conversation
from .logprobs import TokenTexts
from .schemas import image_to_base64
from .serving import APIError, done_error, final, sampling_params, server_of, sse_response, start, text_response


def chat_shape(tokenizer, model_name: str):
    """The bodies of a text chat response, for serving.text_response."""

    texts: dict[int, TokenTexts] = {}  # per choice: streamed chunks' tokens read in their context

    def shape(kind, **k):
        if kind == "id":
            return "chatcmpl"
        base = {"id": k["rid"], "created": k["created"], "model": model_name}
        if kind == "full":
            return base | {"object": "chat.completion", "usage": k["usage"], "choices": [
                {"index": c["index"], "message": {"role": "assistant", "content": c["text"]},
                 "logprobs": TokenTexts(tokenizer).chat(c["logprobs"]), "finish_reason": c["finish"]}
                for c in k["choices"]]}
        if kind == "first":  # the role, as OpenAI sends it, before any text
            delta = {"role": "assistant", "content": ""}
            return base | {"object": "chat.completion.chunk",
                           "choices": [{"index": k["index"], "delta": delta, "logprobs": None, "finish_reason": None}]}
        delta = {"content": k["text"]} if k["text"] else {}
        return base | {"object": "chat.completion.chunk", "choices": [
            {"index": k["index"], "delta": delta,
             "logprobs": texts.setdefault(k["index"], TokenTexts(tokenizer)).chat(k["logprobs"]),
             "finish_reason": k["finish"]}]}

    return shape


async def chat_response(request: Request, body, *, logprobs: int | None = None, include_usage: bool = False):
    """`body`: a chat request (OpenAI's or the native one) with messages, sampling and generation fields."""
    server = server_of(request)
    if body.wants_image:  # what does not depend on the conversation is checked before it is read
        server.check_size(body.size)
        if logprobs is not None:
            raise APIError(400, "logprobs are for text answers, not with modalities [\"image\"]", param="logprobs")
    conv = await read_conversation(body.messages, server.config.allowed_image_domains,
                                   server.config.engine.max_prompt_images)
    template = {"add_generation_prompt": body.add_generation_prompt,
                "continue_final_message": body.continue_final_message}
    if body.wants_image:
        return await _image_response(request, body, conv, template, include_usage)
    adds = [partial(add_conversation, conv=conv, params=sampling_params(body, i, logprobs), **template)
            for i in range(body.n)]
    return await text_response(request, adds, body.stream, chat_shape(server.tokenizer, server.model_name),
                               include_usage)


async def _image_response(request: Request, body, conv, template: dict, include_usage: bool):
    server = server_of(request)
    if body.seed is not None and body.seed >= 2**31:
        raise APIError(400, "seed must be below 2**31 for image output", param="seed")
    options = ImageOptions(n=body.n, size=server.check_size(body.size), steps=body.denoising_steps,
                           guidance_scale=body.guidance_scale, seed=body.seed, negative_prompt=body.negative_prompt)
    events = await start(request, partial(add_conversation, conv=conv, image=options, **template))
    base = {"id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "created": int(time.time()), "model": server.model_name}

    def images_of(done) -> list[dict]:  # PNG encoding: off the event loop
        return [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + image_to_base64(im)}}
                for im in done.images]

    def usage(done) -> dict:
        return {"prompt_tokens": done.prompt_tokens, "completion_tokens": 0, "total_tokens": done.prompt_tokens,
                "images": len(done.images)}

    if not body.stream:
        done = await final(request, events)
        message = {"role": "assistant", "content": "", "images": await asyncio.to_thread(images_of, done)}
        return base | {"object": "chat.completion", "usage": usage(done), "choices": [
            {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}]}

    def chunk(delta: dict, finish: str | None = None, **extra) -> dict:
        return base | {"object": "chat.completion.chunk", **extra,
                       "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    async def chunks():
        yield chunk({"role": "assistant", "content": ""})
        async for ev in events:
            if ev.kind == "step":
                yield chunk({}, progress={"step": ev.step, "steps": ev.steps})
            elif ev.kind == "done":
                if ev.finish_reason == "error":
                    raise done_error(ev)
                yield chunk({"images": await asyncio.to_thread(images_of, ev)}, "stop")
                if include_usage:
                    yield chunk({}) | {"choices": [], "usage": usage(ev)}

    return sse_response(chunks())
