"""OpenAI-compatible routes, so the official `openai` client works unchanged: /v1/chat/completions (whole
conversations with pictures anywhere; text or image answers), /v1/completions (raw prompt, no template),
/v1/models; the image routes are in openai_images.py."""

from __future__ import annotations

from functools import partial

from fastapi import APIRouter, Depends, Request

from ..engine.engine import Engine
from .chat import chat_response
from .logprobs import TokenTexts
from .openai_schemas import OAIChatRequest, OAICompletionRequest, OpenAIFields
from .serving import APIError, admit, sampling_params, server_of, text_response

router = APIRouter()


def check_openai(request: Request, body: OpenAIFields) -> None:
    """The model must be the one served (404); OpenAI's fields at values this server cannot honour are 400s."""
    server_of(request).check_model(body.model)
    refused = body.unsupported()
    if refused is not None:
        raise APIError(400, refused[1], param=refused[0])


@router.post("/v1/chat/completions", dependencies=[Depends(admit)])
async def chat_completions(body: OAIChatRequest, request: Request):
    check_openai(request, body)
    if body.max_completion_tokens:
        body.max_tokens = body.max_completion_tokens
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return await chat_response(request, body, logprobs=logprobs, include_usage=include_usage)


@router.post("/v1/completions", dependencies=[Depends(admit)])
async def completions(body: OAICompletionRequest, request: Request):
    check_openai(request, body)
    server = server_of(request)
    if body.max_completion_tokens:
        body.max_tokens = body.max_completion_tokens
    ids = server.tokenizer(body.prompt).input_ids
    texts: dict[int, TokenTexts] = {}  # per choice: streamed chunks' tokens read in their context

    def shape(kind, **k):
        if kind == "id":
            return "cmpl"
        if kind == "first":
            return None
        base = {"id": k["rid"], "created": k["created"], "model": server.model_name, "object": "text_completion"}
        if kind == "full":
            return base | {"usage": k["usage"], "choices": [
                {"index": c["index"], "text": c["text"], "finish_reason": c["finish"],
                 "logprobs": TokenTexts(server.tokenizer).completion(c["logprobs"])} for c in k["choices"]]}
        lp = texts.setdefault(k["index"], TokenTexts(server.tokenizer)).completion(k["logprobs"])
        return base | {"choices": [{"index": k["index"], "text": k["text"] or "", "finish_reason": k["finish"],
                                    "logprobs": lp}]}

    adds = [partial(Engine.add_text, prompt=ids, params=sampling_params(body, i, body.logprobs)) for i in range(body.n)]
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return await text_response(request, adds, body.stream, shape, include_usage)


@router.get("/v1/models")
async def models(request: Request):
    server = server_of(request)
    return {"object": "list", "data": [_model_card(server)]}


@router.get("/v1/models/{model:path}")
async def model(model: str, request: Request):
    server = server_of(request)
    server.check_model(model)
    return _model_card(server)


def _model_card(server) -> dict:
    """OpenAI's model object, and how the checkpoint answers with an image (image_answer: whether it says what
    it draws first, so that a client knows an image route's revised_prompt is the model's own words)."""
    return {"id": server.model_name, "object": "model", "created": server.started, "owned_by": "xfusion-serve",
            "image_answer": server.image_answer.model_dump()}
