"""Training samples from conversations are the server's sequences plus their targets."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from xfusion_serve import EMBEDDED_CHECKPOINT, ImageSegment, load_checkpoint
from xfusion_serve.engine.flow_matching import initial_noise
from xfusion_serve.model import prompts
from xfusion_serve.model.reference import reference_forward
from xfusion_serve.training.samples import image_answer_sample, noised_target, text_answer_sample
from xfusion_serve.training.trainer import TrainStep


def picture(value: float) -> ImageSegment:
    return ImageSegment(torch.full((4, 8, 8), value), 0.0)


def test_a_text_answer_is_the_servers_prompt_then_the_answer_turn():
    tok = AutoTokenizer.from_pretrained(EMBEDDED_CHECKPOINT / "text_tower")
    a, b = picture(0.0), picture(1.0)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                             {"type": "text", "text": "Are these the same color?"}]}]
    sample = text_answer_sample(tok, messages, [a, b], "no")
    assert tok.decode(sample["targets"]) == "no<|eot|>\n"  # the answer and the template's end of turn
    served = prompts.conversation(tok, messages, [a, b])
    *head, last = sample["segments"]
    assert head == served[:-1] and head[1] is a and head[2] is b  # the same objects, in the same places
    assert last == served[-1] + sample["targets"]


def test_an_image_answer_learns_the_last_picture_not_the_prompts(checkpoint_dir):
    ckpt = load_checkpoint(checkpoint_dir, load_vae=False)
    model = ckpt.model
    with torch.no_grad():
        for p in model.vision.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.1)
    before = ImageSegment(initial_noise((4, 8, 8), 1), 0.0)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "a red circle"}]}]
    x0, noise = initial_noise((4, 8, 8), 2), initial_noise((4, 8, 8), 3)
    sample = image_answer_sample(ckpt.tokenizer, messages, [before], x0, noise, 0.6)
    assert sample["segments"][:-1] == prompts.conversation(ckpt.tokenizer, messages, [before])
    with torch.no_grad():
        dm = TrainStep(model)([sample]).dm
        velocities = reference_forward(model, sample["segments"])[1]
    assert len(velocities) == 2
    torch.testing.assert_close(dm, F.mse_loss(velocities[-1], noise - x0), atol=1e-5, rtol=1e-4)


def test_noised_target_puts_the_image_on_the_rectified_flow_path_with_its_velocity():
    x0, noise = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, -1.0]])
    sample = noised_target([[5, 6]], x0, noise, 0.25)
    assert sample["segments"][0] == [5, 6]
    image = sample["segments"][-1]
    assert image.t == 0.25
    torch.testing.assert_close(image.latent, torch.tensor([[1.5, 1.25]]))  # 0.75 x0 + 0.25 noise, by hand
    torch.testing.assert_close(sample["velocity"], torch.tensor([[2.0, -3.0]]))  # noise - x0
