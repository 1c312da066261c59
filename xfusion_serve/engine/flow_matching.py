"""Flow matching (rectified flow, SD3's formulation): the noise schedule, the starting noise, guidance.

Schedule: diffusers' FlowMatchEulerDiscreteScheduler sigmas with SD3's shift, kept on the CPU as plain
floats (per request: a diffusers scheduler object keeps a step index and cannot be shared).
Step: x_next = x + (sigma_next - sigma) * v, with v = noise - x0 and x_sigma = (1 - sigma) x0 + sigma noise.
"""

from __future__ import annotations

import torch


def flow_sigmas(steps: int, shift: float) -> list[float]:
    """steps + 1 noise levels from 1 (pure noise) down to 0 (the image)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    sched.set_timesteps(steps, device="cpu")
    return [float(s) for s in sched.sigmas]


def initial_noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The starting latent of one image: drawn on the CPU so a seed gives the same image on every device."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def guided(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans; SD3's pipeline): u + scale * (c - u). Scale 1 gives the
    conditional velocity, 0 the unconditional one."""
    return v_uncond + scale * (v_cond - v_uncond)
