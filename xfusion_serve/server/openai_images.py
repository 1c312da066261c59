"""OpenAI's image routes: /v1/images/generations (JSON) and /v1/images/edits (multipart: one or more `image`
or `image[]` files and a prompt; the user's turn holds the pictures, then the prompt). Both take the extra
generation fields (negative_prompt, num_inference_steps / steps, guidance_scale, seed) and stream partial
images as OpenAI does. On a checkpoint that says what it draws first, each item's revised_prompt is that text
(server/text_then_image.py)."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Depends, Request
from starlette.datastructures import UploadFile

from .conversation import ImageOptions
from .openai_schemas import OAIImageRequest
from .schemas import decode_image
from .serving import APIError, admit, final, image_result, server_of, sse_response, validate_body
from .text_then_image import start_image_route

router = APIRouter()


@router.post("/v1/images/generations", dependencies=[Depends(admit)])
async def images_generations(body: OAIImageRequest, request: Request):
    server_of(request).check_model(body.model)
    return await _images_response(request, body, None, "image_generation")


_EDIT_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    **OAIImageRequest.model_json_schema(), "properties": {
        **OAIImageRequest.model_json_schema()["properties"],
        "image": {"type": "array", "items": {"type": "string", "format": "binary"}}}}}}}}


@router.post("/v1/images/edits", dependencies=[Depends(admit)], openapi_extra=_EDIT_BODY)
async def images_edits(request: Request):
    body, pictures = await _edit_form(request, server_of(request))
    return await _images_response(request, body, pictures, "image_edit")


async def _edit_form(request: Request, server):
    """The multipart form -> (the fields, validated as for generations; the pictures). 400: no picture, too
    many, a mask (not supported), an untrained size, an unreadable picture; 404: a model not served; 422: a bad
    field. The pictures are decoded last, off the event loop."""
    max_images = server.config.engine.max_prompt_images
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise APIError(400, "/v1/images/edits takes multipart/form-data (the image files and the fields)")
    form = await request.form()
    if "mask" in form:
        raise APIError(400, "mask is not supported: the whole picture is edited", param="mask")
    files = [v for k, v in form.multi_items() if k in ("image", "image[]")]
    if not files or not all(isinstance(f, UploadFile) for f in files):
        raise APIError(400, "an edit needs one or more `image` files", param="image")
    if len(files) > max_images:
        raise APIError(400, f"{len(files)} images; at most {max_images}", param="image")
    body = validate_body(OAIImageRequest, {k: v for k, v in form.multi_items() if k not in ("image", "image[]")})
    server.check_model(body.model)
    server.check_size(body.size)
    try:
        pictures = [await asyncio.to_thread(decode_image, await f.read()) for f in files]
    except ValueError as e:
        raise APIError(400, str(e), param="image") from e
    return body, pictures


async def _images_response(request: Request, body: OAIImageRequest, pictures, event: str):
    """`pictures`: an edit's (None: a generation); `event`: the streamed events' type prefix
    ("image_generation", "image_edit")."""
    server = server_of(request)
    size = server.check_size(body.size)
    preview_every = 0
    if body.stream and body.partial_images:
        steps = body.denoising_steps or server.default_steps
        preview_every = max(1, steps // (body.partial_images + 1))

    revised, events = await start_image_route(request, body.prompt, ImageOptions.of(body, size, preview_every),
                                              pictures)
    created = int(time.time())
    if not body.stream:
        return await asyncio.to_thread(image_result, await final(request, events), created, revised)

    async def stream():
        partial = 0
        async for ev in events:
            if ev.kind == "step" and ev.preview is not None and partial < body.partial_images:
                for b64 in await asyncio.to_thread(server.preview_b64, ev.preview):
                    yield {"type": f"{event}.partial_image", "b64_json": b64,
                           "partial_image_index": partial, "created_at": created}
                partial += 1
            elif ev.kind == "done":
                result = await asyncio.to_thread(image_result, ev, created, revised)
                for item in result["data"]:
                    yield {"type": f"{event}.completed", "b64_json": item["b64_json"],
                           "revised_prompt": item["revised_prompt"], "created_at": created, "usage": result["usage"]}

    return sse_response(stream())
