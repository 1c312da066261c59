"""X-Fusion checkpoint configuration: what lives in `xfusion_config.json`, validated on load.

A checkpoint directory holds:
    xfusion_config.json        this file's `XFusionConfig`
    text_tower/                an unmodified transformers Llama directory (or `text_tower` points elsewhere)
    vision_tower.safetensors   every trainable parameter
    vae/                       a diffusers AutoencoderKL directory (or `vae` points elsewhere)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

CONFIG_FILE = "xfusion_config.json"
VISION_TOWER_FILE = "vision_tower.safetensors"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and, where it applies, the parameter."""


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise CheckpointError(f"unsupported dtype {name}; use one of {sorted(DTYPES)}")
        return name
    if name not in DTYPES:
        raise CheckpointError(f"unknown dtype {name!r}; use one of {sorted(DTYPES)}")
    return DTYPES[name]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class VisionTowerConfig(_Strict):
    """Shape of the trainable vision blocks. Unset fields copy the text tower's, as the paper does.

    The hidden size always equals the text tower's: both blocks of a layer write the same residual stream.
    """

    intermediate_size: int | None = Field(default=None, gt=0)
    num_attention_heads: int | None = Field(default=None, gt=0)
    num_key_value_heads: int | None = Field(default=None, gt=0)
    timestep_embedding_dim: int = Field(default=256, gt=0, multiple_of=2)


class SamplerDefaults(_Strict):
    steps: int = Field(default=28, ge=1, le=1000)
    guidance_scale: float = Field(default=4.0, ge=0.0)
    # SD3's timestep shift: sigma' = s*sigma / (1 + (s-1)*sigma). 1.0 for small latents.
    shift: float = Field(default=1.0, gt=0.0)


class ImageAnswer(_Strict):
    """How the checkpoint was trained to answer with an image.

    `text_first`: the assistant's turn first says what it draws (the frozen text tower writes it: the demo's
    caption), then draws after that text (demo/recipe.py CAPTION_FIRST). Every image route then decodes that
    text first and draws after it: greedy and at most `max_text_tokens` tokens, unless the request asked for
    the text (chat's modalities ["text", "image"]: its own sampling and max_tokens). False: images are drawn straight after the prompt (the paper's generation
    sequence, arXiv 2504.20996 section 3).
    """

    text_first: bool = False
    max_text_tokens: int = Field(default=64, ge=1)


class XFusionConfig(_Strict):
    format_version: int = 1
    # A path relative to the checkpoint directory, an absolute local directory, or a hub id.
    text_tower: str = "text_tower"
    vae: str = "vae"
    vision_tower: VisionTowerConfig = VisionTowerConfig()
    # Trained image sizes in pixels, as (height, width).
    image_sizes: list[tuple[int, int]] = [(256, 256)]
    patch_size: int = Field(default=2, ge=1)
    xfuse: bool = False
    sampler: SamplerDefaults = SamplerDefaults()
    image_answer: ImageAnswer = ImageAnswer()

    @field_validator("image_sizes")
    @classmethod
    def _sizes(cls, sizes: list[tuple[int, int]]) -> list[tuple[int, int]]:
        if not sizes:
            raise ValueError("image_sizes must name at least one trained size")
        for h, w in sizes:
            if h <= 0 or w <= 0:
                raise ValueError(f"image size {h}x{w} must be positive")
        return sizes

    @model_validator(mode="after")
    def _version(self) -> "XFusionConfig":
        if self.format_version != 1:
            raise ValueError(f"format_version {self.format_version} is not supported (this build reads 1)")
        return self

    @classmethod
    def load(cls, checkpoint_dir: str | Path) -> "XFusionConfig":
        path = Path(checkpoint_dir) / CONFIG_FILE
        if not path.is_file():
            raise CheckpointError(f"{path}: missing; a checkpoint directory must hold {CONFIG_FILE}")
        try:
            return cls.model_validate(json.loads(path.read_text()))
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from e
        except ValidationError as e:
            raise CheckpointError(f"{path}: invalid configuration:\n{e}") from e

    def save(self, checkpoint_dir: str | Path) -> None:
        path = Path(checkpoint_dir) / CONFIG_FILE
        path.write_text(json.dumps(self.model_dump(mode="json"), indent=2) + "\n")


def resolve_component(checkpoint_dir: str | Path, ref: str, what: str) -> Path:
    """Find a component directory: inside the checkpoint, an absolute path, or (with a network) a hub id."""
    local = Path(checkpoint_dir) / ref
    if local.is_dir():
        return local
    if Path(ref).is_absolute() or ref.startswith((".", "~")) or ref.count("/") != 1:
        raise CheckpointError(f"{local}: missing {what} directory (from {CONFIG_FILE}: {ref!r})")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(ref))
    except Exception as e:  # offline, unknown repo, no permission: all the same to the user
        raise CheckpointError(
            f"{what} {ref!r} is neither a directory under {checkpoint_dir} nor a reachable hub id ({e})"
        ) from e


@dataclass(frozen=True)
class VAEInfo:
    """What the model needs from the VAE's own config.json (never duplicated in ours)."""

    latent_channels: int
    downsample: int
    scaling_factor: float
    shift_factor: float

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """The latent [C, h, w] of a height x width image (pixels)."""
        return self.latent_channels, height // self.downsample, width // self.downsample

    @classmethod
    def from_dir(cls, vae_dir: Path) -> "VAEInfo":
        path = vae_dir / "config.json"
        if not path.is_file():
            raise CheckpointError(f"{path}: missing; the VAE must be a diffusers AutoencoderKL directory")
        cfg = json.loads(path.read_text())
        if cfg.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
            raise CheckpointError(f"{path}: _class_name is {cfg['_class_name']!r}, expected 'AutoencoderKL'")
        return cls(
            latent_channels=int(cfg.get("latent_channels", 4)),
            downsample=2 ** (len(cfg.get("block_out_channels", [64])) - 1),
            scaling_factor=float(cfg.get("scaling_factor", 0.18215)),
            shift_factor=float(cfg.get("shift_factor") or 0.0),
        )
