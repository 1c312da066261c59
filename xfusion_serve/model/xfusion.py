"""The X-Fusion dual-tower model (arXiv 2504.20996, section 4) in plain torch.

Every layer holds the frozen text block of a LLaMA-3 model and a trainable vision block of the same kind.
The text block serves the queries of text tokens, the vision block those of image tokens; each attends over
keys/values that its own weights compute for every token. Text is causal; the tokens of one image see each
other both ways. The text tower's parameters carry their transformers names (`model.layers.0.self_attn...`),
so a standard Llama directory loads without conversion.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from transformers import LlamaConfig

from .config import VAEInfo, XFusionConfig
from .llama import MLP, Attention, Block, RMSNorm, Rotary, TextTower
from .sequence import AttentionFn, ImageSegment, Segment, SequenceInputs


def vision_block_config(text_cfg: LlamaConfig, cfg: XFusionConfig) -> LlamaConfig:
    """The vision blocks' Llama config: the text tower's, with the overrides of `vision_tower`."""
    vcfg = LlamaConfig.from_dict(text_cfg.to_dict())
    v = cfg.vision_tower
    if v.num_attention_heads is not None and v.num_attention_heads != text_cfg.num_attention_heads:
        vcfg.head_dim = text_cfg.hidden_size // v.num_attention_heads
    for name in ("intermediate_size", "num_attention_heads", "num_key_value_heads"):
        if getattr(v, name) is not None:
            setattr(vcfg, name, getattr(v, name))
    if vcfg.num_attention_heads % vcfg.num_key_value_heads:
        raise ValueError("vision_tower: num_attention_heads must be a multiple of num_key_value_heads")
    return vcfg


def timestep_frequencies(dim: int) -> torch.Tensor:
    steps = torch.arange(dim // 2, dtype=torch.float32, device="cpu")  # real values even under a meta device
    return torch.exp(-math.log(10000.0) * steps / (dim // 2))


def timestep_features(t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Sinusoidal features of t in [0, 1], scaled to the 0..1000 range diffusion models are built for.
    freqs from timestep_frequencies, computed once: the arguments reach 1000 radians, where one ulp of a
    frequency moves a feature by 1e-5, so a compiled step must not recompute them its own way."""
    args = (t.float() * 1000.0)[:, None] * freqs.to(t.device)
    return torch.cat((args.cos(), args.sin()), dim=-1)


class VisionTower(nn.Module):
    """Every trainable parameter of X-Fusion; saved alone as vision_tower.safetensors."""

    def __init__(self, text_cfg: LlamaConfig, cfg: XFusionConfig, vae: VAEInfo):
        super().__init__()
        vcfg = vision_block_config(text_cfg, cfg)
        hidden, p = text_cfg.hidden_size, cfg.patch_size
        patch_dim = vae.latent_channels * p * p
        grid = max(h for h, _ in cfg.image_sizes) // (vae.downsample * p), max(
            w for _, w in cfg.image_sizes
        ) // (vae.downsample * p)
        self.layers = nn.ModuleList(Block(vcfg) for _ in range(text_cfg.num_hidden_layers))
        self.patch_embed = nn.Linear(patch_dim, hidden)
        self.time_embed = nn.Sequential(
            nn.Linear(cfg.vision_tower.timestep_embedding_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden)
        )
        self.time_freqs = timestep_frequencies(cfg.vision_tower.timestep_embedding_dim)  # float32, not a buffer
        self.pos_embed = nn.Parameter(torch.zeros(*grid, hidden))
        self.boi = nn.Parameter(torch.zeros(hidden))
        self.eoi = nn.Parameter(torch.zeros(hidden))
        self.norm = RMSNorm(hidden, text_cfg.rms_norm_eps)
        self.proj_out = nn.Linear(hidden, patch_dim)
        if cfg.xfuse:
            self.xfuse_alpha = nn.Parameter(torch.ones(text_cfg.num_hidden_layers))
            self.xfuse_beta = nn.Parameter(torch.zeros(text_cfg.num_hidden_layers))


class XFusionModel(nn.Module):
    # For training losses on intermediate features (feature alignment, training/alignment.py): when set,
    # forward's mixed text-and-image loop calls it after every layer with (layer index from 0, the hidden
    # states after that layer [..., T, D], image rows holding the vision block's output). None: never called.
    # The single-modality stacks (decode and denoising steps) never call it.
    layer_output_hook: Callable[[int, torch.Tensor], None] | None = None

    def __init__(self, text_cfg: LlamaConfig, cfg: XFusionConfig, vae: VAEInfo):
        super().__init__()
        self.config, self.text_config, self.vae_info = cfg, text_cfg, vae
        self.text = TextTower(text_cfg)
        self.vision = VisionTower(text_cfg, cfg, vae)
        self.rope = Rotary(text_cfg)
        self.vision_rope = Rotary(vision_block_config(text_cfg, cfg))

    def tables_to(self, device: torch.device | str) -> "XFusionModel":
        """Moves the float32 frequency tables (RoPE's, the timesteps'; plain attributes, so that
        model.to(dtype) never rounds them) to the device, so that no step copies them there again."""
        for rope in (self.rope, self.vision_rope):
            rope.inv_freq = rope.inv_freq.to(device)
        self.vision.time_freqs = self.vision.time_freqs.to(device)
        return self

    # ---- inputs -------------------------------------------------------------------------------------------
    def patchify(self, latent: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, (H/p)*(W/p), C*p*p], row-major over patches."""
        p = self.config.patch_size
        B, C, H, W = latent.shape
        x = latent.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(B, (H // p) * (W // p), C * p * p)

    def unpatchify(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """[B, N, C*p*p] -> [B, C, H, W] for a latent of height x width."""
        p, C = self.config.patch_size, self.vae_info.latent_channels
        B = x.shape[0]
        x = x.reshape(B, height // p, width // p, C, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(B, C, height, width)

    def embed_image(self, latent: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Scaled latents [B, C, H, W] at noise levels t [B] -> image tokens [B, N, D]."""
        v, p = self.vision, self.config.patch_size
        gh, gw = latent.shape[-2] // p, latent.shape[-1] // p
        tokens = v.patch_embed(self.patchify(latent).to(v.patch_embed.weight.dtype))
        temb = v.time_embed(timestep_features(t, v.time_freqs).to(tokens.dtype))
        return tokens + temb[:, None] + v.pos_embed[:gh, :gw].reshape(gh * gw, -1)

    def velocity(self, h_image: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Image-token outputs [B, N, D] -> predicted velocity (noise - x0) as a latent [B, C, H, W]."""
        return self.unpatchify(self.vision.proj_out(self.vision.norm(h_image)), height, width)

    def embed_sequence(self, segments: list[Segment]) -> SequenceInputs:
        """Text ids and images -> one sequence; each image is wrapped in the learned begin/end-of-image."""
        parts, image_ids, slices, n = [], [], [], 0
        embed = self.text.model.embed_tokens
        for seg in segments:
            if isinstance(seg, ImageSegment):
                t = torch.tensor([seg.t], device=seg.latent.device)
                tokens = self.embed_image(seg.latent[None], t)[0]
                parts += [self.vision.boi[None], tokens, self.vision.eoi[None]]
                slices.append(slice(n + 1, n + 1 + len(tokens)))
                image_ids += [-1] + [len(slices) - 1] * len(tokens) + [-1]
                n += len(tokens) + 2
            else:
                ids = torch.as_tensor(seg, dtype=torch.long, device=embed.weight.device)
                parts.append(embed(ids))
                image_ids += [-1] * len(ids)
                n += len(ids)
        device = embed.weight.device
        return SequenceInputs(
            embeds=torch.cat(parts).to(embed.weight.dtype),
            positions=torch.arange(n, device=device),
            image_ids=torch.tensor(image_ids, device=device),
            image_slices=slices,
        )

    # ---- the dual-tower stack ----------------------------------------------------------------------------
    def forward(self, h: torch.Tensor, positions: torch.Tensor, image_ids: torch.Tensor,
                attention: AttentionFn) -> torch.Tensor:
        """Hidden states [..., T, D] (a padded batch or packed tokens) -> final hidden states (pre-norm).
        image_ids: per token, the image it belongs to or -1 for text.

        Per layer, the text block serves text-token queries and the vision block image-token queries, each
        over keys/values its own weights compute for every token. `attention` decides which tokens a query
        sees and where keys/values are kept (a mask for whole sequences, a paged cache in the engine).
        A tower with no query to serve is skipped unless `attention` keeps its keys/values for later.
        """
        is_image = image_ids >= 0
        text_rows = torch.ones_like(is_image) if self.config.xfuse else ~is_image
        run_text = attention.keeps("text") or bool(text_rows.any())
        run_vision = attention.keeps("vision") or bool(is_image.any())
        if not run_vision:
            return self.text_forward(h, positions, attention)
        if not run_text:
            return self.image_forward(h, positions, attention)
        cos, sin = self.rope(positions, h.dtype)
        vcos, vsin = self.vision_rope(positions, h.dtype)
        for i, text_block in enumerate(self.text.model.layers):
            out = h.clone()
            text_out = self._tower(text_block, h, text_rows, cos, sin, attention, "text", i)
            if text_out is not None:
                out[text_rows] = text_out
            img_out = self._tower(self.vision.layers[i], h, is_image, vcos, vsin, attention, "vision", i)
            if img_out is not None:
                if self.config.xfuse:
                    img_out = self._xfuse(i, img_out, out[is_image])
                out[is_image] = img_out
            h = out
            if self.layer_output_hook is not None:
                self.layer_output_hook(i, h)
        return h

    # The two single-modality stacks below look at no token's modality: no masks, no host syncs, so each
    # compiles into one graph (a decode step, a denoising step).
    def text_forward(self, h: torch.Tensor, positions: torch.Tensor, attention: AttentionFn) -> torch.Tensor:
        """Every token text (a decode step): the text tower alone, exactly the base LLM."""
        cos, sin = self.rope(positions, h.dtype)
        for i, block in enumerate(self.text.model.layers):
            h = self._tower(block, h, None, cos, sin, attention, "text", i)
        return h

    def image_forward(self, h: torch.Tensor, positions: torch.Tensor, attention: AttentionFn) -> torch.Tensor:
        """Every token an image token (a denoising step): the vision tower, mixed with the text tower's
        output of the same tokens under X-Fuse."""
        cos, sin = self.vision_rope(positions, h.dtype)
        if self.config.xfuse:
            tcos, tsin = self.rope(positions, h.dtype)
        for i, block in enumerate(self.vision.layers):
            out = self._tower(block, h, None, cos, sin, attention, "vision", i)
            if self.config.xfuse:
                out = self._xfuse(i, out, self._tower(self.text.model.layers[i], h, None, tcos, tsin, attention,
                                                      "text", i))
            h = out
        return h

    def _xfuse(self, layer: int, vision_out: torch.Tensor, text_out: torch.Tensor) -> torch.Tensor:
        """X-Fuse: image tokens take alpha * vision block + beta * text block."""
        return self.vision.xfuse_alpha[layer] * vision_out + self.vision.xfuse_beta[layer] * text_out

    @staticmethod
    def _tower(block: Block, h, rows, cos, sin, attention, tower: str, layer: int) -> torch.Tensor | None:
        return block.serve_rows(h, rows, cos, sin, attention, tower, layer)

    def fuse_projections(self, transposed: bool = False) -> "XFusionModel":
        """For inference: every block's q/k/v and gate/up projections as one matrix multiply each (see
        Attention.fuse); `transposed`: every block weight stored [in, out] (llama.fuse_linears: faster for
        MKL's few-row multiplies on the CPU). Same parameters, same names, no added memory."""
        for block in [*self.text.model.layers, *self.vision.layers]:
            block.self_attn.fuse(transposed)
            block.mlp.fuse(transposed)
        return self

    def use_matmul(self, matmul) -> "XFusionModel":
        """Every matrix multiply of both towers' blocks and of the LM head through `matmul(x, weight, bias)`
        (same result as F.linear, to float rounding): a kernel of the engine's. Default F.linear."""
        for module in self.modules():
            if isinstance(module, (Attention, MLP, TextTower)):
                module.matmul = matmul
        return self

    def requires_grad_vision_only(self) -> "XFusionModel":
        self.text.requires_grad_(False)
        self.vision.requires_grad_(True)
        return self
