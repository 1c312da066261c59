"""The demo's training samples: the conversation tasks of demo/tasks.py as the server builds them for /v1/chat
(training/samples.py), and the plain routes' forms (/v1/generate-image: the prompt's text then the image;
/v1/caption: the image then an instruction), drawn in fixed proportions (MIX).

Image answers (draw, edit, generate) learn the flow-matching velocity of their target, with the prompt
dropped to the engine's shared empty one (`prompts.generation_prompt("")`) for `caption_dropout` of them, so
that classifier-free guidance has its unconditional branch. Text answers (question, describe, compare,
caption, and edit-text: the edited picture's caption) learn the answer's tokens; their pictures are clean unless `caption_max_noise` > 0 (then each is
noised to t ~ U(0, caption_max_noise): the paper's ablation of section 6). Pictures are VAE-encoded as they
first occur and cached (the world has about ten thousand distinct ones), and so are the prompts' tokens (the
chat template is slow next to a step of this small model).
"""

from __future__ import annotations

import hashlib
import random

import torch
from PIL import Image

from ..model import prompts
from ..model.checkpoint import Checkpoint
from ..model.latents import encode_images
from ..model.sequence import ImageSegment
from ..training.samples import noised_target, text_answer_sample
from ..training.trainer import TrainConfig
from .shapes import render
from .tasks import DESCRIBE, Task, make_task

# Drawing gets the most: a prompt's attributes steer the image only after some hundred thousand samples that
# name them (at 3/13 of 6000 steps of 64 the drawings ignored their prompts: colour 13%, the prior alone).
# Edits and two-picture questions are the next hardest; the plain routes' forms are kept for their users.
# "edit-text" is an edit's text answer: the caption of the edited picture, which the turn opens with when image
# answers say what they draw first (CAPTION_FIRST in demo/recipe.py) and which the frozen LM must write from the
# picture's K/V and the instruction. Without it no sample taught that text: 12 of 15 wrong edits of the v6 demo
# came from a wrong caption (the image then drew what the caption said).
MIX = {"draw": 6.0, "edit": 3.0, "edit-text": 2.0, "question": 2.0, "compare": 2.0, "describe": 1.0,
       "generate": 2.0, "caption": 1.0}
TASK_OF = {"generate": "draw", "caption": "describe", "edit-text": "edit"}
IMAGE_ANSWERS = ("draw", "edit", "generate")


class TaskSamples:
    """A SampleSource (training/trainer.py) of the shapes world's tasks. cfg: its seed, data_seed,
    caption_dropout, caption_max_noise and timestep distribution are used; mix: kind -> weight. Raises
    ValueError for an unknown kind or no positive weight."""

    def __init__(self, cfg: TrainConfig, mix: dict[str, float] | None = None, *, caption_first: bool = False):
        self.cfg, self.mix, self.caption_first = cfg, dict(MIX if mix is None else mix), caption_first
        unknown = set(self.mix) - set(MIX)
        if unknown or not any(w > 0 for w in self.mix.values()) or any(w < 0 for w in self.mix.values()):
            raise ValueError(f"mix: non-negative weights of {sorted(MIX)}, one at least positive; got {self.mix}")

    def prepare(self, ckpt: Checkpoint, height: int, width: int, show_progress: bool) -> None:
        self.vae, self.tokenizer, self.size = ckpt.vae, ckpt.tokenizer, (height, width)
        self.latents: dict[bytes, torch.Tensor] = {}
        self.prompts: dict[tuple, dict] = {}

    def batch(self, step: int, indices: range) -> list[dict]:
        drawn = [self._draw(step, j) for j in indices]
        self._encode([im for _, task, target, _, _ in drawn for im in [*task.pictures, target] if im is not None])
        return [self._sample(*d) for d in drawn]

    def _draw(self, step: int, j: int) -> tuple[str, Task, Image.Image | None, random.Random, torch.Generator]:
        rng = random.Random(f"{self.cfg.seed}:{step}:{j}")
        gen = torch.Generator().manual_seed(rng.getrandbits(63))
        kind = rng.choices(list(self.mix), weights=list(self.mix.values()))[0]
        task = make_task(self.cfg.data_seed, rng.getrandbits(48), TASK_OF.get(kind, kind))
        target = task.target_image if task.kind == "edit" else render(task.target, rng) if task.target else None
        if kind not in IMAGE_ANSWERS:
            target = None  # edit-text draws nothing: its target picture is not encoded
        return kind, task, target, rng, gen

    def _sample(self, kind: str, task: Task, target: Image.Image | None, rng: random.Random,
                gen: torch.Generator) -> dict:
        tok, cfg = self.tokenizer, self.cfg
        if kind in IMAGE_ANSWERS:
            x0 = self._latent(target)
            noise = torch.randn(x0.shape, generator=gen)
            t = torch.sigmoid(torch.randn((), generator=gen) * cfg.timestep_std + cfg.timestep_mean).item()
            pictures = [ImageSegment(self._latent(p), 0.0) for p in task.pictures]
            if rng.random() < cfg.caption_dropout:
                prompt = [prompts.generation_prompt(tok, "")]
            elif kind == "generate":
                prompt = [prompts.generation_prompt(tok, task.messages[-1]["content"][-1]["text"])]
            elif self.caption_first:
                prompt = self._cached(task, None, pictures, said=task.target.caption)["segments"]
            else:
                prompt = self._cached(task, None, pictures)["segments"]
            return noised_target(prompt, x0, noise, t)
        pictures = [self._noised(self._latent(p), rng, gen) for p in task.pictures]
        clean = {"x0": self._latent(task.pictures[-1])} if task.pictures else {}  # the last picture's, unnoised
        if kind == "caption":
            answer = prompts.encode(tok, task.answer) + [tok.eos_token_id]
            instruction = prompts.caption_instruction(tok, rng.choice(["", *DESCRIBE]))
            return {"segments": [prompts.caption_prefix(tok), pictures[0], instruction + answer], "targets": answer,
                    **clean}
        answer = task.target.caption if kind == "edit-text" else task.answer
        return self._cached(task, answer, pictures) | clean

    def _cached(self, task: Task, answer: str | None, pictures: list[ImageSegment], said: str | None = None) -> dict:
        """image_answer_sample's prompt (answer None; with `said`, the assistant's turn opened with that text, as
        the server builds it for modalities ["text", "image"]) or text_answer_sample, built once per text and
        number of pictures with stand-ins, then with these pictures in the stand-ins' places."""
        key = (repr(task.messages), answer, said)
        if key not in self.prompts:
            stand_ins = [ImageSegment(torch.zeros(0), 0.0) for _ in pictures]
            if answer is not None:
                self.prompts[key] = text_answer_sample(self.tokenizer, task.messages, stand_ins, answer)
            elif said is None:
                self.prompts[key] = {"segments": prompts.conversation(self.tokenizer, task.messages, stand_ins)}
            else:
                self.prompts[key] = {"segments": prompts.conversation(
                    self.tokenizer, task.messages + [{"role": "assistant", "content": said}], stand_ins,
                    add_generation_prompt=False, continue_final_message=True)}
        cached, given = self.prompts[key], iter(pictures)
        segments = [next(given) if isinstance(s, ImageSegment) else s for s in cached["segments"]]
        return cached | {"segments": segments}

    def _noised(self, x0: torch.Tensor, rng: random.Random, gen: torch.Generator) -> ImageSegment:
        if self.cfg.caption_max_noise <= 0:
            return ImageSegment(x0, 0.0)
        t = rng.uniform(0.0, self.cfg.caption_max_noise)
        return ImageSegment((1 - t) * x0 + t * torch.randn(x0.shape, generator=gen), t)

    def _key(self, image: Image.Image) -> bytes:
        return hashlib.sha1(image.tobytes()).digest()

    def _latent(self, image: Image.Image) -> torch.Tensor:
        return self.latents[self._key(image)]

    @torch.no_grad()
    def _encode(self, images: list[Image.Image]) -> None:
        new = {self._key(im): im for im in images if self._key(im) not in self.latents}
        if new:
            encoded = encode_images(self.vae, list(new.values()), *self.size).cpu()
            self.latents.update(zip(new, encoded))
