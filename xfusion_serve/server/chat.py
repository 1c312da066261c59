"""A chat turn, for /v1/chat/completions and /v1/chat alike: the whole conversation (pictures included) is the
prompt; the answer is text (n choices, log-probabilities) or, with `modalities: ["image"]`, images, or with
`modalities: ["text", "image"]` (and ["image"] on a checkpoint that says what it draws first) text and then
images drawn after it.

Images come back as OpenRouter-style gateways and SGLang-Omni give them: `message.content` stays a string (the
text before them, or "") and `message.images` is [{"type": "image_url", "image_url": {"url":
"data:image/png;base64,..."}}]. Streamed, the first chunk carries the role, then the text's deltas (with
["text", "image"]), one chunk per denoising step (`progress`), then `delta.images`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from functools import partial

from fastapi import Request

from .conversation import ImageOptions, add_conversation, read_conversation
from .logprobs import TokenTexts
from .schemas import image_to_base64
from .serving import APIError, done_error, final, sampling_params, server_of, sse_response, start, text_response
from .text_then_image import TextThenImage, unasked_text_params


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
        if body.text_before_image and not (body.add_generation_prompt or body.continue_final_message):
            raise APIError(400, "modalities [\"text\", \"image\"] needs the assistant's turn: add_generation_prompt "
                                "or continue_final_message", param="add_generation_prompt")
        if logprobs is not None:
            raise APIError(400, "logprobs are for text answers, not with an image in modalities", param="logprobs")
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
    """Images, or text and then images (server/text_then_image.py): with modalities ["text", "image"], or with
    ["image"] on a checkpoint that says what it draws first (its text, greedy and at most
    image_answer.max_text_tokens as on the image routes, is the message's content). Asked for, the text is
    decoded with the request's sampling; the n images are drawn after it."""
    server = server_of(request)
    if body.seed is not None and body.seed >= 2**31:
        raise APIError(400, "seed must be below 2**31 for image output", param="seed")
    options = ImageOptions.of(body, server.check_size(body.size))
    answer = TextThenImage(request, conv, options, **template)
    opens_turn = template["add_generation_prompt"] or template["continue_final_message"]
    text_first = body.text_before_image or (server.image_answer.text_first and opens_turn)
    if text_first:  # text the client asked for takes its sampling; text it did not ask for is the image routes'
        first = await answer.say(sampling_params(body) if body.text_before_image
                                 else unasked_text_params(server.image_answer))
    else:
        first = await start(request, partial(add_conversation, conv=conv, image=options, **template))
    base = {"id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "created": int(time.time()), "model": server.model_name}

    def images_of(done) -> list[dict]:  # PNG encoding: off the event loop
        return [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + image_to_base64(im)}}
                for im in done.images]

    def usage(done, said) -> dict:  # the conversation's tokens, and the text's (image tokens are not counted)
        prompt, completion = (said.prompt_tokens, said.step) if said else (done.prompt_tokens, 0)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "images": len(done.images)}

    def finish_of(said) -> str:  # "length": the text was cut at max_tokens, and the images drawn after it
        return said.finish_reason if said else "stop"

    if not body.stream:
        said = await final(request, first) if text_first else None
        done = await final(request, await answer.draw(said.text) if said else first)
        message = {"role": "assistant", "content": said.text if said else "",
                   "images": await asyncio.to_thread(images_of, done)}
        return base | {"object": "chat.completion", "usage": usage(done, said), "choices": [
            {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_of(said)}]}

    def chunk(delta: dict, finish: str | None = None, **extra) -> dict:
        return base | {"object": "chat.completion.chunk", **extra,
                       "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    async def chunks():
        yield chunk({"role": "assistant", "content": ""})
        events, said, sent = first, None, ""
        if text_first:  # the text as it is written (the rest, held back, with its end); then the image
            async with contextlib.aclosing(first):  # a client that leaves mid-text cancels it at once
                async for ev in first:
                    if ev.kind == "token" and ev.text:
                        sent += ev.text
                        yield chunk({"content": ev.text})
                    elif ev.kind == "done":
                        if ev.finish_reason == "error":
                            raise done_error(ev)
                        said = ev
                        if ev.text[len(sent):]:
                            yield chunk({"content": ev.text[len(sent):]})
            if said is None:
                raise APIError(500, "the text ended without its done event", "server_error")
            events = await answer.draw(said.text)
        async for ev in events:
            if ev.kind == "step":
                yield chunk({}, progress={"step": ev.step, "steps": ev.steps})
            elif ev.kind == "done":
                if ev.finish_reason == "error":
                    raise done_error(ev)
                yield chunk({"images": await asyncio.to_thread(images_of, ev)}, finish_of(said))
                if include_usage:
                    yield chunk({}) | {"choices": [], "usage": usage(ev, said)}

    return sse_response(chunks())
