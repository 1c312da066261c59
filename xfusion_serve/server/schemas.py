"""Validated HTTP requests and the responses' shapes (OpenAI's where one exists)."""

from __future__ import annotations

import base64
import binascii
import io
from typing import Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_IMAGE_PIXELS = 4096 * 4096
MAX_IMAGE_BYTES = 20 << 20


class StrictModel(BaseModel):
    """A request body. A misspelt option ("temprature") silently ignored gives an answer the client did not ask
    for: unknown fields are refused. An explicit null is the field's default, as OpenAI takes it."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data):
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data


class GenerationFields(StrictModel):
    """Image generation's options, on every route that draws (images, edits, chat with image output)."""

    negative_prompt: str = Field(default="", max_length=10_000)
    size: str | None = Field(default=None, pattern=r"^(\d{1,5}x\d{1,5}|auto)$")
    steps: int | None = Field(default=None, ge=1, le=200)
    num_inference_steps: int | None = Field(default=None, ge=1, le=200)  # diffusers' name for `steps`
    guidance_scale: float | None = Field(default=None, ge=0.0, le=50.0)

    @property
    def denoising_steps(self) -> int | None:
        return self.num_inference_steps or self.steps


class ImageURL(BaseModel):
    url: str
    detail: Literal["auto", "low", "high"] | None = None  # accepted; a picture always takes the trained size


class ContentPart(BaseModel):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None


class Message(BaseModel):
    """A message of a conversation, in OpenAI's shape: content a string or parts (text, image_url). An assistant message may carry the images it returned earlier
    (`images`, as this server's responses give them): they are part of the prompt, after its text."""

    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    images: list[ContentPart] | None = None


class SamplingFields(StrictModel):
    max_tokens: int = Field(default=256, ge=1, le=8192)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)  # greedy unless asked: the base LLM's own answer
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stop: list[str] | str | None = Field(default=None, validate_default=True)
    stop_token_ids: list[int] = Field(default_factory=list, max_length=64)
    ignore_eos: bool = False
    stream: bool = False

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 16 or any(len(s) > 256 for s in stops):
            raise ValueError("at most 16 stop strings of at most 256 characters")
        return stops


class ConversationFields(GenerationFields):
    """What every chat route takes beyond sampling: the conversation, the answer's kind, its choices."""

    messages: list[Message] = Field(min_length=1, max_length=512)
    modalities: list[Literal["text", "image"]] = Field(default_factory=lambda: ["text"], min_length=1)
    n: int = Field(default=1, ge=1, le=8)  # text: n choices (seed s: choice i samples with s + i); image: n images
    # (after one text, with ["text", "image"])
    add_generation_prompt: bool = True  # vLLM's: False leaves the prompt as the template renders the messages
    continue_final_message: bool = False  # vLLM's: the last (assistant) message is continued, left open

    @property
    def wants_image(self) -> bool:
        """An image answer: modalities ["image"] (the turn is the image) or ["text", "image"] (text, then the
        image drawn after it)."""
        return "image" in self.modalities

    @property
    def text_before_image(self) -> bool:
        """modalities ["text", "image"]: the turn's text is decoded first, and the n images are drawn after it."""
        return self.wants_image and "text" in self.modalities


class ChatRequest(SamplingFields, ConversationFields):
    """/v1/chat: OpenAI's messages (pictures as image_url parts anywhere), the native defaults (greedy)."""


class CaptionRequest(SamplingFields):
    image: str = Field(description="base64 image bytes, or a data: URI")
    prompt: str | None = Field(default=None, max_length=10_000)
    max_tokens: int = Field(default=64, ge=1, le=1024)


class ImageRequest(GenerationFields):
    prompt: str = Field(min_length=1, max_length=10_000)
    n: int = Field(default=1, ge=1, le=8)
    seed: int | None = Field(default=None, ge=0, lt=2**31)
    response_format: Literal["b64_json"] = "b64_json"
    stream: bool = False
    preview_every: int = Field(default=0, ge=0)


def decode_image(data: bytes) -> Image.Image:
    """Bytes -> an RGB image, checking the pixel count from the header before any decoding."""
    if len(data) > MAX_IMAGE_BYTES:
        raise ValueError(f"image larger than {MAX_IMAGE_BYTES} bytes")
    try:
        im = Image.open(io.BytesIO(data))
        if im.width * im.height > MAX_IMAGE_PIXELS:
            raise ValueError(f"image of {im.width}x{im.height} pixels is over the {MAX_IMAGE_PIXELS} limit")
        im.load()
        return im.convert("RGB")
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 - any decoder failure is the client's bad image
        raise ValueError(f"not a readable image ({type(e).__name__})") from e


def image_from_base64(text: str) -> Image.Image:
    if text.startswith("data:"):
        header, _, text = text.partition(",")
        if ";base64" not in header:
            raise ValueError("a data URI must be base64 encoded")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError("image is not valid base64") from e
    return decode_image(data)


def image_to_base64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()
