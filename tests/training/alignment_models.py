"""Tiny random image encoders for the feature-alignment tests, built from configs (no download)."""

from __future__ import annotations

from pathlib import Path

import torch

KINDS = ("dinov2", "clip", "clip_vision", "siglip", "siglip_vision")


def make_tiny_encoder(out_dir: str | Path, kind: str = "dinov2", *, image_size: int = 16, patch_size: int = 4,
                      hidden: int = 32, seed: int = 0) -> Path:
    """Writes a 2-layer random transformers vision model and its image processor config to out_dir.
    kind: "dinov2" (Dinov2Model: a CLS token), "clip" / "siglip" (the full two-tower model, text included),
    "clip_vision" / "siglip_vision" (the vision model alone; CLIP's has a CLS token, SigLIP's none).
    The processor asks for image_size x image_size inputs. -> out_dir."""
    from transformers import (CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig, CLIPVisionModel, Dinov2Config,
                              Dinov2Model, SiglipConfig, SiglipModel, SiglipTextConfig, SiglipVisionConfig,
                              SiglipVisionModel)
    from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    vision = dict(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2, image_size=image_size,
                  patch_size=patch_size)
    text = dict(vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=16)
    torch.manual_seed(seed)
    if kind == "dinov2":
        model = Dinov2Model(Dinov2Config(**vision, mlp_ratio=2))
        processor = BitImageProcessorPil(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    elif kind.startswith("clip"):
        vcfg = CLIPVisionConfig(**vision, intermediate_size=2 * hidden)
        model = CLIPVisionModel(vcfg) if kind == "clip_vision" else CLIPModel(
            CLIPConfig(text_config=CLIPTextConfig(**text).to_dict(), vision_config=vcfg.to_dict(), projection_dim=hidden))
        processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                          crop_size={"height": image_size, "width": image_size})
    else:
        vcfg = SiglipVisionConfig(**vision, intermediate_size=2 * hidden)
        model = SiglipVisionModel(vcfg) if kind == "siglip_vision" else SiglipModel(
            SiglipConfig(text_config=SiglipTextConfig(**text).to_dict(), vision_config=vcfg.to_dict()))
        processor = SiglipImageProcessorPil(size={"height": image_size, "width": image_size})
    out = Path(out_dir)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
