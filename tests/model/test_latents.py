"""The VAE latent convention and the 2x2 patch layout, pinned against hand computations."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from xfusion_serve import load_checkpoint
from xfusion_serve.model.latents import decode_latents, encode_images


class StandInVAE:
    """An AutoencoderKL's interface with an exactly invertible map: z = 2x + 1 (posterior mean), x = (z - 1) / 2,
    and the scaling and shift factors of a real VAE's config."""

    def __init__(self, scaling_factor: float, shift_factor: float | None):
        self.config = SimpleNamespace(scaling_factor=scaling_factor, shift_factor=shift_factor)
        self.device, self.dtype = torch.device("cpu"), torch.float64

    def encode(self, x):
        return SimpleNamespace(latent_dist=SimpleNamespace(mode=lambda: 2 * x + 1))

    def decode(self, z):
        return SimpleNamespace(sample=(z - 1) / 2)


@pytest.mark.parametrize("scale, shift", [(0.18215, None), (1.5305, 0.0609), (0.5, 0.1)])
def test_encode_scales_after_shifting_and_decode_inverts_it(scale, shift):
    pixels = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    vae = StandInVAE(scale, shift)
    latents = encode_images(vae, [Image.fromarray(pixels)], 8, 8)
    z = 2 * (torch.from_numpy(pixels).permute(2, 0, 1).double() / 127.5 - 1) + 1
    torch.testing.assert_close(latents[0].double(), (z - (shift or 0.0)) * scale, rtol=0, atol=1e-5)
    back = decode_latents(vae, latents)[0]
    assert np.array_equal(np.asarray(back), pixels)  # decode after encode returns the exact input


def test_patchify_layout_and_round_trip(checkpoint_dir):
    model = load_checkpoint(checkpoint_dir, load_vae=False).model
    C, H, W, p = model.vae_info.latent_channels, 4, 6, model.config.patch_size
    x = torch.arange(2 * C * H * W, dtype=torch.float32).reshape(2, C, H, W)
    patches = model.patchify(x)
    assert patches.shape == (2, (H // p) * (W // p), C * p * p)
    for b in range(2):
        for k in range((H // p) * (W // p)):
            row, col = divmod(k, W // p)  # patches in row-major order
            by_hand = [x[b, c, row * p + dy, col * p + dx].item() for c in range(C) for dy in range(p) for dx in range(p)]
            assert patches[b, k].tolist() == by_hand
    assert torch.equal(model.unpatchify(patches, H, W), x)
