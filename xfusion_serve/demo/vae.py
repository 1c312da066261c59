"""A small diffusers AutoencoderKL for the 64x64 shapes world, trained from scratch."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from tqdm import tqdm

from ..model.latents import images_to_tensor
from . import shapes

log = logging.getLogger(__name__)


def build_vae():
    from diffusers import AutoencoderKL

    levels = (16, 32, 64, 64)  # 64x64 pixels -> 8x8 latents
    return AutoencoderKL(
        block_out_channels=levels, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=8, norm_num_groups=8, layers_per_block=1,
        sample_size=shapes.SIZE, mid_block_add_attention=False,
    )


def train_vae(out: Path, *, steps: int, batch_size: int, seed: int, lr: float = 2e-3, kl_weight: float = 1e-6) -> Path:
    torch.manual_seed(seed)
    vae = build_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    bar = tqdm(range(steps), desc="vae", mininterval=5)
    for step in bar:
        x = images_to_tensor([shapes.sample(seed, step * batch_size + i)[1] for i in range(batch_size)],
                             shapes.SIZE, shapes.SIZE)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        # L1 keeps the flat colours and hard edges sharper than MSE alone.
        loss = (rec - x).abs().mean() + (rec - x).pow(2).mean() + kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")

    # SD3's latent normalisation, (z - shift) * scale, fitted on fresh samples.
    vae.eval()
    with torch.no_grad():
        x = images_to_tensor([shapes.sample(seed + 1, i)[1] for i in range(512)], shapes.SIZE, shapes.SIZE)
        z = vae.encode(x).latent_dist.mode()
    vae.register_to_config(shift_factor=float(z.mean()), scaling_factor=float(1.0 / z.std()))
    vae.save_pretrained(out)
    log.info("VAE: shift %.4f scale %.4f", vae.config.shift_factor, vae.config.scaling_factor)
    return out
