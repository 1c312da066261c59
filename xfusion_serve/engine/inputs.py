"""Requests from what callers give: token ids, or text and pictures in order (segments), sampling parameters or
generation options -> the engine's TextRequest / ImageRequest. `Engine` inherits it."""

from __future__ import annotations

import random

import torch
from PIL import Image

from ..model import prompts
from ..model.latents import encode_images
from ..model.sequence import ImageSegment, Segment, image_tokens
from .flow_matching import flow_sigmas, initial_noise
from .request import ImageRequest, TextRequest
from .text_sampling import SamplingParams


def _segments(prompt: list[int] | list[Segment]) -> list[Segment]:
    """Token ids (one text segment) or segments -> segments."""
    return [list(prompt)] if not prompt or isinstance(prompt[0], int) else list(prompt)


class RequestInputs:
    """Needs the engine's ckpt, config, runner (its device and dtype), tokenizer and `_add` (which queues)."""

    def add_text(self, prompt: list[int] | list[Segment], params: SamplingParams) -> str:
        """A text answer to `prompt`: token ids, or segments (text ids and clean `ImageSegment`s, e.g. from
        `encode_image` and `prompts.conversation`). -> the request id."""
        segments = _segments(prompt)
        self._check_images(segments)
        return self._add(TextRequest(prompt=segments, params=params, stop_ids=self._stop_ids(params),
                                     patch_size=self.ckpt.config.patch_size))

    def add_caption(self, image: Image.Image, instruction: str | None, params: SamplingParams) -> str:
        return self.add_text([prompts.caption_prefix(self.tokenizer), self.encode_image(image),
                              prompts.caption_instruction(self.tokenizer, instruction)], params)

    def encode_image(self, image: Image.Image, size: tuple[int, int] | None = None) -> ImageSegment:
        """A picture for a prompt: resized to `size` (height, width; default the first trained size), VAE
        encoded, clean (t = 0)."""
        h, w = size or self.ckpt.config.image_sizes[0]
        latent = encode_images(self.ckpt.vae, [image], h, w)[0].to(self.runner.device, self.runner.dtype)
        return ImageSegment(latent, 0.0)

    def add_image(self, prompt: str | list[Segment], *, negative_prompt: str = "", n: int = 1,
                  size: tuple[int, int] | None = None, steps: int | None = None, guidance_scale: float | None = None,
                  seed: int | None = None, preview_every: int = 0) -> str:
        """Images for `prompt`: a text, or the segments before the image (a conversation, an edit's pictures;
        `prompts.generation_prompt` and `prompts.conversation` build them). The unconditional row is
        `negative_prompt` (the shared empty prompt by default). -> the request id."""
        cfg = self.ckpt.config
        height, width = size or cfg.image_sizes[0]
        if (height, width) not in cfg.image_sizes:
            raise ValueError(f"size {width}x{height} is not one of the trained sizes")
        segments = _segments(prompts.generation_prompt(self.tokenizer, prompt) if isinstance(prompt, str) else prompt)
        self._check_images(segments)
        shape = self.ckpt.model.vae_info.latent_shape(height, width)
        seed = random.SystemRandom().randrange(2**31) if seed is None else seed
        seeds = [seed + i for i in range(n)]
        latents = torch.stack([initial_noise(shape, s) for s in seeds]).to(self.runner.device)
        negative = prompts.generation_prompt(self.tokenizer, negative_prompt)
        return self._add(ImageRequest(
            prompt=segments, negative=[negative], seeds=seeds,
            shared_negative=negative == prompts.generation_prompt(self.tokenizer, ""),
            sigmas=flow_sigmas(steps or cfg.sampler.steps, cfg.sampler.shift),
            guidance_scale=cfg.sampler.guidance_scale if guidance_scale is None else guidance_scale,
            latents=latents, preview_every=preview_every, patch_size=cfg.patch_size))

    def _check_images(self, segments: list[Segment]) -> None:
        """The limits on a prompt's pictures (EngineConfig.max_prompt_images, max_prompt_image_tokens)."""
        images = [s for s in segments if isinstance(s, ImageSegment)]
        if len(images) > self.config.max_prompt_images:
            raise ValueError(f"{len(images)} images in one prompt; at most {self.config.max_prompt_images}")
        tokens = sum(image_tokens(s.latent, self.ckpt.config.patch_size) for s in images)
        if tokens > self.config.max_prompt_image_tokens:
            raise ValueError(f"the prompt's images take {tokens} tokens; at most "
                             f"{self.config.max_prompt_image_tokens} (EngineConfig.max_prompt_image_tokens)")

    def _stop_ids(self, params: SamplingParams) -> set[int]:
        return set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.ckpt.eos_token_ids))
