"""Training samples from conversations: the same sequences the server builds for them (model/prompts.py), with
a next-token target for a text answer or a flow-matching target for an image answer (X-Fusion, section 3).

A text answer's targets are the tokens the chat template writes for the assistant's turn, its end-of-turn
included: the conversation rendered with the answer, less the conversation rendered with the generation
prompt (the way TRL and others take a turn's tokens). An image answer is the noisy target after the
conversation's prompt, as the engine generates it: the prompt, then <boi> image <eoi>.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from ..model import prompts
from ..model.sequence import ImageSegment, Segment


def text_answer_sample(tokenizer: PreTrainedTokenizerBase, messages: list[dict], pictures: list[ImageSegment],
                       answer: str) -> dict:
    """-> {"segments", "targets"} for TrainStep: the prompt the server builds, then the answer's turn.
    ValueError: a chat template that does not render the answered turn as the prompt followed by more."""
    prompt = prompts.conversation(tokenizer, messages, pictures)
    full = prompts.conversation(tokenizer, messages + [{"role": "assistant", "content": answer}], pictures,
                                add_generation_prompt=False)
    head, last = prompt[:-1], prompt[-1]
    if isinstance(last, ImageSegment) or len(full) != len(prompt) or full[-1][: len(last)] != last:
        raise ValueError("the chat template does not render the answer after the prompt")
    targets = full[-1][len(last):]
    if not targets:
        raise ValueError("an empty answer turn")
    return {"segments": head + [last + targets], "targets": targets}


def image_answer_sample(tokenizer: PreTrainedTokenizerBase, messages: list[dict], pictures: list[ImageSegment],
                        x0: torch.Tensor, noise: torch.Tensor, t: float) -> dict:
    """-> {"segments", "velocity"} for TrainStep: the prompt the server builds, then the target image x0
    [C, h, w] (scaled latents) noised to level t as x_t = (1 - t) x0 + t noise; the velocity is noise - x0."""
    return noised_target(prompts.conversation(tokenizer, messages, pictures), x0, noise, t)


def noised_target(prompt: list[Segment], x0: torch.Tensor, noise: torch.Tensor, t: float) -> dict:
    """-> {"segments", "velocity", "x0"} for TrainStep: `prompt`, then the target x0 [C, h, w] (scaled latents) noised
    to level t in [0, 1] on the rectified-flow path x_t = (1 - t) x0 + t noise (SD3, section 2); the velocity
    to learn is d x_t / dt = noise - x0."""
    return {"segments": [*prompt, ImageSegment((1 - t) * x0 + t * noise, t)], "velocity": noise - x0, "x0": x0}
