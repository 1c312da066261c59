"""Requests and what they emit: their state while the engine serves them, and the events of each step.

A text request (chat, completion, caption) holds its prompt, its output so far and its KV blocks; an image
request holds its prompts, its current latents and sigmas, and its prompt-cache tables. An `Event` is what
a request did in one step.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import torch
from PIL import Image

from ..model.sequence import ImageSegment, Segment, image_tokens, sequence_key, sequence_length, text_only
from .text_sampling import SamplingParams, TokenLogprobs

_ids = itertools.count()


@dataclass(eq=False)
class TextRequest:
    """Chat, completions and captions: `prompt` is the whole prompt, text ids and clean images (a caption's
    image, the pictures of a conversation) in order; the answer is text."""

    prompt: list[Segment]
    params: SamplingParams
    stop_ids: set[int]
    patch_size: int = 2
    id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    output: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    arrival: float = field(default_factory=time.monotonic)
    admitted_at: float | None = None
    logprobs: TokenLogprobs | None = None  # the last sampled token's, until its event carries them

    def __post_init__(self):
        self.generator = self.params.generator()
        # Read every step (the scheduler, the metrics) and fixed for life: found once.
        self.prompt_len = sequence_length(self.prompt, self.patch_size)
        self.has_images = not text_only(self.prompt)

    @property
    def length(self) -> int:
        return self.prompt_len + len(self.output)

    def segments(self) -> list[Segment]:
        """The whole sequence so far: what a (re)computing prefill runs."""
        if self.prompt and not isinstance(self.prompt[-1], ImageSegment):
            return self.prompt[:-1] + [self.prompt[-1] + self.output]
        return self.prompt + [self.output]


@dataclass(eq=False)
class ImageRequest:
    """Image generation: `prompt` and `negative` (the unconditional row) are the sequences before the image,
    text ids and clean images (an edit's input pictures, a conversation's); the begin-of-image follows them."""

    prompt: list[Segment]
    negative: list[Segment]
    seeds: list[int]  # one per image
    sigmas: list[float]
    guidance_scale: float
    latents: torch.Tensor  # [n, C, h, w], the current x_sigma of every image
    preview_every: int = 0
    patch_size: int = 2
    shared_negative: bool = False  # `negative` is the empty prompt every guided request shares (kept pinned)
    id: str = field(default_factory=lambda: f"img-{next(_ids)}")
    step: int = 0
    tables: dict[str, dict[str, list[int]]] = field(default_factory=dict)  # "cond"/"uncond" -> tower -> blocks
    finish_reason: str | None = None
    arrival: float = field(default_factory=time.monotonic)
    admitted_at: float | None = None

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    @property
    def guided(self) -> bool:
        return self.guidance_scale != 1.0

    def __post_init__(self):
        # The prompt cache's keys, hashed once (an image's digest reads its latent).
        self.keys = {"cond": sequence_key(self.prompt), "uncond": sequence_key(self.negative)}
        self._lengths = {"cond": sequence_length(self.prompt, self.patch_size) + 1,
                         "uncond": sequence_length(self.negative, self.patch_size) + 1}

    def prompt_of(self, role: str) -> list[Segment]:
        return self.prompt if role == "cond" else self.negative

    @property
    def image_tokens(self) -> int:
        return image_tokens(self.latents, self.patch_size)

    def prompt_len(self, role: str) -> int:
        """Positions of that role's prompt, its begin-of-image included: where the image's tokens start."""
        return self._lengths[role]


@dataclass
class Event:
    """What a request did this step: new text ("token"), a denoising step ("step"), or its end ("done")."""

    request_id: str
    kind: str
    text: str = ""  # token: the new text; done: the whole text (captions, chat)
    token_ids: list[int] = field(default_factory=list)
    step: int = 0
    steps: int = 0
    preview: torch.Tensor | None = None  # step: the current x0 prediction (scaled latents), when asked
    images: list[Image.Image] | None = None  # done (image requests)
    seeds: list[int] | None = None  # done (image requests): the seed of each image
    finish_reason: str | None = None
    error: str | None = None
    error_type: str | None = None  # "invalid_request_error" (the request itself) or "server_error"
    prompt_tokens: int = 0  # done (text requests): the prompt's length, image tokens included
    logprobs: list[TokenLogprobs] | None = None  # token / done: those of token_ids, when the request asked

    def merged(self, later: "Event") -> "Event":
        """Two token events of one request as one: the text, token ids and log-probabilities of both."""
        logprobs = None if self.logprobs is None and later.logprobs is None else \
            (self.logprobs or []) + (later.logprobs or [])
        return Event(self.request_id, "token", text=self.text + later.text, token_ids=self.token_ids + later.token_ids,
                     logprobs=logprobs)
