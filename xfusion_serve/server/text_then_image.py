"""Image answers, the one path of every image route: drawn straight after the prompt, or after text.

The text comes first for chat's modalities ["text", "image"], and for every image request to a checkpoint
trained to say what it draws before drawing it (XFusionConfig.image_answer.text_first: the demo's recipe,
CAPTION_FIRST). The assistant's text is decoded first, its max_tokens capped so that the image still fits the
context; the images are then drawn after the conversation with the assistant's turn opened by that text
(`Conversation.answered_with`: the sequence such a checkpoint was trained on).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial

from fastapi import Request
from PIL import Image

from ..engine.request import Event
from ..engine.text_sampling import SamplingParams
from ..model.config import ImageAnswer
from .conversation import Conversation, ImageOptions, add_conversation
from .serving import final, server_of, start


@dataclass
class TextThenImage:
    """The text of a conversation's assistant turn, then images drawn after it."""

    request: Request
    conv: Conversation
    image: ImageOptions
    add_generation_prompt: bool = True
    continue_final_message: bool = False

    async def say(self, params: SamplingParams) -> AsyncIterator[Event]:
        """Queues the text (admitted as any request is) -> its events. 400: no room for the text and the image."""
        return await start(self.request, partial(
            add_conversation, conv=self.conv, params=params, image_after=self.image,
            add_generation_prompt=self.add_generation_prompt, continue_final_message=self.continue_final_message))

    async def draw(self, said: str) -> AsyncIterator[Event]:
        """Queues the images drawn after `said` -> their events. Never refused halfway (a full queue or a drain):
        the request was admitted with its text."""
        opened = self.conv.answered_with(said, self.continue_final_message)
        return await start(self.request, partial(add_conversation, conv=opened, image=self.image,
                                                 add_generation_prompt=False, continue_final_message=True),
                           admitted=True)

    async def said_then_drawn(self, params: SamplingParams) -> tuple[Event, AsyncIterator[Event]]:
        """The text's done event, once it is written, and the events of the images drawn after it."""
        said = await final(self.request, await self.say(params))
        return said, await self.draw(said.text)


def unasked_text_params(answer: ImageAnswer) -> SamplingParams:
    """The sampling of the text a text_first checkpoint says before its image when the client asked for an image
    only: greedy, at most answer.max_text_tokens, so that every route draws the same image for a prompt and
    seed."""
    return SamplingParams(max_tokens=answer.max_text_tokens)


async def start_image_route(request: Request, prompt: str, image: ImageOptions,
                            pictures: list[Image.Image] | None = None) -> tuple[str, AsyncIterator[Event]]:
    """An image route's request (/v1/images/generations, /v1/images/edits with `pictures`, /v1/generate-image)
    -> (the text the images are drawn after: OpenAI's revised_prompt; their events).

    On a text_first checkpoint: the user's turn (pictures, then `prompt`), the assistant's text (greedy, at
    most image_answer.max_text_tokens), then the images. Otherwise straight after the prompt: a generation after
    the bare prompt (model/prompts.generation_prompt), an edit after the user's turn with its pictures."""
    answer = server_of(request).image_answer
    conv = Conversation.of_user(prompt, pictures)
    if answer.text_first:
        said, events = await TextThenImage(request, conv, image).said_then_drawn(unasked_text_params(answer))
        return said.text, events
    add = partial(add_conversation, conv=conv, image=image) if pictures else partial(image.add, prompt=prompt)
    return prompt, await start(request, add)
