"""Flow matching pinned against independent values: the guidance formula, the shifted schedule, per-image
seeds, the x0 preview. (Cached == uncached tests share these helpers, so they cannot catch a bug in them.)"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import set_config

from xfusion_serve import Engine, EngineConfig, load_checkpoint
from xfusion_serve.engine.flow_matching import flow_sigmas, guided, initial_noise


def test_guidance_is_uncond_plus_scale_times_the_difference():
    c, u = torch.tensor([1.0, 2.0, -4.0]), torch.tensor([3.0, 5.0, 0.5])
    assert torch.equal(guided(c, u, 1.0), c)  # scale 1: the conditional velocity
    assert torch.equal(guided(c, u, 0.0), u)  # scale 0: the unconditional one
    torch.testing.assert_close(guided(c, u, 2.5), torch.tensor([-2.0, -2.5, -10.75]))  # by hand: u + 2.5 (c - u)


def sd3_sigmas(steps: int, shift: float, train_steps: int = 1000) -> list[float]:
    """SD3's schedule written out (diffusers' FlowMatchEulerDiscreteScheduler, static shift): sigmas spaced
    evenly from 1 to the shifted 1/train_steps, shifted by s*x / (1 + (s-1)*x), then a final 0."""
    def shifted(x: float) -> float:
        return shift * x / (1 + (shift - 1) * x)

    lo = shifted(1 / train_steps)
    evenly = [1.0] if steps == 1 else [1.0 + (lo - 1.0) * i / (steps - 1) for i in range(steps)]
    return [shifted(x) for x in evenly] + [0.0]


@pytest.mark.parametrize("steps", [1, 2, 4, 28])
@pytest.mark.parametrize("shift", [1.0, 3.0, 0.5])
def test_schedule_is_sd3s_shifted_schedule(steps, shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sigmas = flow_sigmas(steps, shift)
    assert sigmas == pytest.approx(sd3_sigmas(steps, shift), abs=1e-6)
    reference = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    reference.set_timesteps(steps)
    assert sigmas == pytest.approx(reference.sigmas.tolist(), abs=1e-6)


def test_the_checkpoints_shift_reaches_every_request(checkpoint_dir):
    set_config(checkpoint_dir, sampler={"steps": 3, "guidance_scale": 2.0, "shift": 3.0})
    engine = Engine(load_checkpoint(checkpoint_dir), EngineConfig(block_size=4))
    req = engine.requests[engine.add_image("a red circle", seed=0)]
    assert req.sigmas == flow_sigmas(3, 3.0) and req.sigmas[1] == pytest.approx(sd3_sigmas(3, 3.0)[1])
    assert not math.isclose(req.sigmas[1], flow_sigmas(3, 1.0)[1])  # the shift moves the middle sigma


def test_image_i_of_a_request_is_image_0_of_seed_plus_i(random_checkpoint_dir):
    engine = Engine(load_checkpoint(random_checkpoint_dir), EngineConfig(block_size=4))
    kw = {"steps": 2, "guidance_scale": 2.0}
    three = engine.requests[engine.add_image("a blue square", n=3, seed=40, **kw)]
    alone = [engine.requests[engine.add_image("a blue square", n=1, seed=s, **kw)] for s in (41, 42)]
    done = engine.run([three.id] + [r.id for r in alone])
    assert done[three.id].seeds == [40, 41, 42]
    for i, other in enumerate(alone, 1):
        torch.testing.assert_close(three.latents[i], other.latents[0], atol=1e-5, rtol=0)
        assert not torch.allclose(three.latents[0], other.latents[0], atol=1e-2)
    assert torch.equal(initial_noise((4, 2, 2), 41), initial_noise((4, 2, 2), 41))


def test_a_one_step_preview_is_the_final_image(random_checkpoint_dir):
    """x0 = x - sigma * v: after the single step from sigma 1 to 0, the image itself."""
    engine = Engine(load_checkpoint(random_checkpoint_dir), EngineConfig(block_size=4))
    req = engine.requests[engine.add_image("a green triangle", seed=5, steps=1, preview_every=1)]
    previews = []
    while engine.has_work():
        previews += [ev.preview for ev in engine.step() if ev.kind == "step"]
    assert len(previews) == 1 and torch.equal(previews[0], req.latents)
    assert not torch.allclose(req.latents[0], initial_noise(req.latents.shape[1:], 5), atol=1e-3)  # it moved
