"""The offline Python API: batches in, answers out, no server. `Engine` inherits it:

    engine = Engine.from_checkpoint("xfusion_serve/checkpoints/shapes-demo")
    engine.chat([[{"role": "user", "content": "What shapes are there?"}]])
"""

from __future__ import annotations

from PIL import Image

from ..model import prompts
from .text_sampling import SamplingParams


class OfflineAPI:
    """Each call adds its requests to the engine at once (they are batched together) and steps until all are
    done. Needs the engine's add_text / add_caption / add_image / run and its tokenizer."""

    def complete(self, prompt_texts: list[str], params: SamplingParams | None = None) -> list[str]:
        """Raw prompts (the tokenizer's special tokens added, no template) -> their completions."""
        ids = [self.add_text(self.tokenizer(p).input_ids, params or SamplingParams()) for p in prompt_texts]
        done = self.run(ids)
        return [done[i].text for i in ids]

    def chat(self, conversations: list[list[dict]], params: SamplingParams | None = None) -> list[str]:
        """Conversations ([{"role", "content"}, ...]) through the chat template -> the assistant's answers."""
        ids = [self.add_text(prompts.chat_prompt(self.tokenizer, c), params or SamplingParams()) for c in conversations]
        done = self.run(ids)
        return [done[i].text for i in ids]

    def caption(self, images: list[Image.Image], instruction: str | None = None,
                params: SamplingParams | None = None) -> list[str]:
        ids = [self.add_caption(im, instruction, params or SamplingParams(max_tokens=64)) for im in images]
        done = self.run(ids)
        return [done[i].text for i in ids]

    def generate_images(self, prompt_texts: list[str], seeds: list[int] | None = None, **kw) -> list[Image.Image]:
        """One request per prompt (n images each, n=1 by default; add_image's options as keywords) -> every
        image, in order."""
        seeds = seeds or [None] * len(prompt_texts)
        ids = [self.add_image(p, seed=s, **kw) for p, s in zip(prompt_texts, seeds)]
        done = self.run(ids)
        return [im for i in ids for im in done[i].images]

    def warm_up(self) -> None:
        """One short request of each kind (chat, caption, image) through every path, before serving."""
        ids = [self.add_text(self.tokenizer("hello").input_ids, SamplingParams(max_tokens=2)),
               self.add_caption(Image.new("RGB", (64, 64), "white"), None, SamplingParams(max_tokens=2)),
               self.add_image("warm up", steps=1, seed=0)]
        self.run(ids)
