"""OpenAI's request bodies, as the official client sends them (chat, completions, images), strict: a field OpenAI
does not have is a 422, not silently ignored. OpenAI's own fields are all accepted at the values that change
nothing (`frequency_penalty: 0`, `logit_bias: {}`, ...); any other value of one is a 400 that names it
(`unsupported`). An explicit null means the field's default (schemas.StrictModel)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from .schemas import ConversationFields, GenerationFields, SamplingFields, StrictModel


class StreamOptions(StrictModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's; accepted, usage comes once at the end
    include_obfuscation: bool | None = None  # OpenAI's; nothing to obfuscate here


# OpenAI's fields this server has nothing behind, with the values that ask for nothing.
NO_OP: dict[str, tuple] = {
    "frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0), "logit_bias": ({},), "store": (False,),
    "metadata": ({},), "service_tier": ("auto", "default"), "parallel_tool_calls": (True, False), "tools": ([],),
    "tool_choice": ("none", "auto"), "functions": ([],), "function_call": ("none", "auto"),
    "response_format": ({"type": "text"},), "best_of": (1,), "echo": (False,), "suffix": ("",),
    "prediction": (), "audio": (), "reasoning_effort": (), "web_search_options": (), "verbosity": (),
}


class OpenAIFields(StrictModel):
    """The fields every OpenAI text route shares, whatever their value does here."""

    model: str | None = None
    user: str | None = None  # OpenAI's end-user id: accepted, not used
    stream_options: StreamOptions | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    parallel_tool_calls: bool | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None
    prediction: Any = None
    audio: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None
    verbosity: Any = None

    def unsupported(self) -> tuple[str, str] | None:
        """The first OpenAI field set to a value this server cannot honour -> (its name, why); else None."""
        for name, allowed in NO_OP.items():
            value = getattr(self, name, None)
            # 0 == False in Python: a bool only matches a bool
            if value is not None and not any(value == a and isinstance(value, bool) == isinstance(a, bool)
                                             for a in allowed):
                shown = ", ".join(repr(a) for a in allowed)
                return name, f"{name}={value!r} is not supported here" + (f" (only {shown})" if shown else "")
        return None


class OAISampling(OpenAIFields, SamplingFields):
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)  # OpenAI's default
    max_completion_tokens: int | None = Field(default=None, ge=1, le=8192)


class OAIChatRequest(OAISampling, ConversationFields):
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)


class OAICompletionRequest(OAISampling):
    prompt: str = Field(min_length=1, max_length=100_000)
    n: int = Field(default=1, ge=1, le=8)  # choices; with a seed s, choice i is sampled with seed s + i
    max_tokens: int = Field(default=16, ge=1, le=8192)  # OpenAI's default for completions
    logprobs: int | None = Field(default=None, ge=0, le=5)  # OpenAI's legacy completions: up to 5
    best_of: int | None = None
    echo: bool | None = None
    suffix: str | None = None


class OAIImageRequest(GenerationFields):
    prompt: str = Field(min_length=1, max_length=10_000)
    model: str | None = None
    user: str | None = None
    n: int = Field(default=1, ge=1, le=8)
    seed: int | None = Field(default=None, ge=0, lt=2**31)  # image i of n is drawn with seed + i
    response_format: Literal["b64_json"] = "b64_json"
    output_format: Literal["png"] = "png"
    quality: Literal["auto", "standard"] | None = None
    style: None = None
    background: Literal["auto"] | None = None
    moderation: Literal["auto", "low"] | None = None
    stream: bool = False
    partial_images: int = Field(default=0, ge=0, le=3)
