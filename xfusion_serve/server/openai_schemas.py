"""OpenAI's request bodies, as the official client sends them (chat, completions, images), strict: an unknown
field is a 422, not silently ignored."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from .schemas import SamplingFields, StrictModel


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


class OAIImageRequest(StrictModel):
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
