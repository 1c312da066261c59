"""A conversation in OpenAI's messages -> its pictures (data URIs, or fetched from the allowed domains) and the
engine request it becomes: a text answer, or images drawn with the whole conversation as their prompt."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from urllib.parse import urlparse

from PIL import Image

from ..engine.engine import Engine
from ..engine.text_sampling import SamplingParams
from ..model import prompts
from ..model.sequence import image_tokens, sequence_length
from .schemas import MAX_IMAGE_BYTES, ContentPart, GenerationFields, Message, decode_image, image_from_base64
from .serving import APIError


@dataclass
class Conversation:
    """`messages` as model/prompts.conversation takes them (image parts as {"type": "image"}) and their
    pictures in order."""

    messages: list[dict]
    images: list[Image.Image]
    pictures: list | None = None  # their VAE latents, encoded once on the engine thread for every choice

    @classmethod
    def of_user(cls, text: str, pictures: list[Image.Image] | None = None) -> "Conversation":
        """One user turn: the pictures, then the text (an image route's prompt; /v1/images/edits sends
        pictures)."""
        pictures = pictures or []
        content = [{"type": "image"}] * len(pictures) + [{"type": "text", "text": text.strip()}] if pictures \
            else text.strip()
        return cls([{"role": "user", "content": content}], pictures)

    def answered_with(self, text: str, continue_final_message: bool) -> "Conversation":
        """This conversation with the assistant's turn opened by `text` (appended to the last message when that
        turn was being continued), its pictures shared: the prompt of an image that follows the answer's text."""
        messages = list(self.messages)
        if continue_final_message:
            last = messages[-1]
            content = last["content"] + text if isinstance(last["content"], str) else \
                [*last["content"], {"type": "text", "text": text}]
            messages[-1] = {**last, "content": content}
        else:
            messages.append({"role": "assistant", "content": text})
        return Conversation(messages, self.images, self.pictures)


async def fetch_image(url: str, allowed: list[str]) -> Image.Image:
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
    return await asyncio.to_thread(decode_image, data)


async def load_image(url: str, allowed_domains: list[str]) -> Image.Image:
    """A data URI or an allowed http(s) URL -> the picture, decoded off the event loop."""
    try:
        if url.startswith(("http://", "https://")):
            return await fetch_image(url, allowed_domains)
        return await asyncio.to_thread(image_from_base64, url)
    except ValueError as e:
        raise APIError(400, str(e), param="messages") from e


async def read_conversation(messages: list[Message], allowed_domains: list[str], max_images: int) -> Conversation:
    """OpenAI messages -> a Conversation. A "developer" message is a system message; an assistant message's
    `images` follow its text. Errors (400): an image part without a URL, more than `max_images` pictures, an
    image that cannot be read or fetched."""
    parts_of = [(m, list(m.content) if isinstance(m.content, list) else
                 [ContentPart(type="text", text=m.content or "")]) for m in messages]
    count = sum(p.type == "image_url" for _, parts in parts_of for p in parts) + sum(
        len(m.images or []) for m in messages)
    if count > max_images:
        raise APIError(400, f"{count} images in the conversation; at most {max_images}", param="messages")
    out, images = [], []
    for m, parts in parts_of:
        content = []
        for part in parts + list(m.images or []):
            if part.type == "text":
                content.append({"type": "text", "text": part.text or ""})
                continue
            if part.image_url is None:
                raise APIError(400, "an image_url part needs an image_url.url", param="messages")
            images.append(await load_image(part.image_url.url, allowed_domains))
            content.append({"type": "image"})
        if all(p["type"] == "text" for p in content):  # plain text: exactly what the chat template is given
            content = "".join(p["text"] for p in content)
        out.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    return Conversation(out, images)


@dataclass
class ImageOptions:
    """What engine.add_image takes beyond the prompt."""

    n: int = 1
    size: tuple[int, int] | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None
    negative_prompt: str = ""
    preview_every: int = 0

    @classmethod
    def of(cls, body: GenerationFields, size: tuple[int, int] | None, preview_every: int = 0) -> "ImageOptions":
        """A drawing request's options (its GenerationFields, n and seed), its size checked by the caller."""
        return cls(n=body.n, size=size, steps=body.denoising_steps, guidance_scale=body.guidance_scale,
                   seed=body.seed, negative_prompt=body.negative_prompt, preview_every=preview_every)

    def add(self, engine: Engine, prompt: str | list) -> str:
        """engine.add_image of `prompt` (a bare generation prompt or segments) with these options -> the id."""
        return engine.add_image(prompt, n=self.n, size=self.size, steps=self.steps,
                                guidance_scale=self.guidance_scale, seed=self.seed,
                                negative_prompt=self.negative_prompt, preview_every=self.preview_every)


def add_conversation(engine: Engine, conv: Conversation, *, params: SamplingParams | None = None,
                     image: ImageOptions | None = None, add_generation_prompt: bool = True,
                     continue_final_message: bool = False, image_after: ImageOptions | None = None) -> str:
    """Runs on the engine's thread: the pictures through the VAE encoder, the conversation's segments, then a
    text request (`params`) or an image request (`image`). `image_after`: the text is to be followed by that
    image, so its max_tokens is capped to leave the image room in the context. -> the request id. ValueError:
    a bad conversation, or one that leaves no room for text and the image."""
    if conv.pictures is None:
        conv.pictures = [engine.encode_image(im) for im in conv.images]
    segments = prompts.conversation(engine.tokenizer, conv.messages, conv.pictures,
                                    add_generation_prompt=add_generation_prompt,
                                    continue_final_message=continue_final_message)
    if image is not None:
        return image.add(engine, segments)
    if image_after is not None:
        params = replace(params, max_tokens=min(params.max_tokens, _room_for_text(engine, segments, image_after)))
    return engine.add_text(segments, params)


# The image is drawn after the text as written, tokenized again: a few tokens more than were decoded when the
# text ends inside a character (its bytes come back as U+FFFD).
RETOKENIZE_SLACK = 4


def _room_for_text(engine: Engine, segments: list, image: ImageOptions) -> int:
    """Tokens of text that fit between `segments` and an image of image.size (<boi>, its tokens, <eoi>), with
    RETOKENIZE_SLACK to spare."""
    cfg = engine.ckpt.config
    height, width = image.size or cfg.image_sizes[0]
    image_len = image_tokens(engine.ckpt.model.vae_info.latent_shape(height, width), cfg.patch_size) + 2
    room = engine.scheduler.max_model_len - sequence_length(segments, cfg.patch_size) - image_len - RETOKENIZE_SLACK
    if room < 1:
        raise ValueError(f"the conversation leaves no room for text before a {width}x{height} image in the "
                         f"model's context ({engine.scheduler.max_model_len} tokens)")
    return room
