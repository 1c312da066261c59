"""The X-Fusion dual-tower model (arXiv 2504.20996, section 4) in plain torch.

Every layer holds the frozen text block of a LLaMA-3 model and a trainable vision block of the same kind.
The text block serves the queries of text tokens, the vision block those of image tokens; each attends over
keys/values that its own weights compute for every token. Text is causal; the tokens of one image see each
other both ways. The text tower's parameters carry their transformers names (`model.layers.0.self_attn...`),
so a standard Llama directory loads without conversion.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from .config import VAEInfo, XFusionConfig

# RoPE types whose frequencies depend on the sequence length at run time; a static cache cannot use them.
_DYNAMIC_ROPE = {"dynamic", "longrope"}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 and cast back before the weight, as transformers' LlamaRMSNorm does (one op
        # instead of five; tests/test_model.py holds it to transformers' logits).
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


class Rotary(nn.Module):
    """cos/sin tables for RoPE; the frequencies come from transformers' own rope functions (llama3 included)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        rope = cfg.rope_parameters or {"rope_type": "default", "rope_theta": 10000.0}
        kind = rope.get("rope_type", "default")
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        if kind in _DYNAMIC_ROPE or (kind != "default" and kind not in ROPE_INIT_FUNCTIONS):
            raise ValueError(f"rope_type {kind!r} is not supported (use default, linear, llama3 or yarn)")
        with torch.device("cpu"):  # real values even when the model is built on the meta device
            if kind == "default":
                steps = torch.arange(0, head_dim, 2, dtype=torch.float)
                inv_freq, scale = 1.0 / (rope["rope_theta"] ** (steps / head_dim)), 1.0
            else:
                inv_freq, scale = ROPE_INIT_FUNCTIONS[kind](cfg)
        # A plain float32 attribute, not a buffer: model.to(bfloat16) must not round the frequencies.
        self.inv_freq = inv_freq.float()
        self.scale = float(scale)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [..., T] -> cos, sin [..., 1, T, head_dim] (broadcast over heads), sin's first half negated:
        rotate_half(x) * sin is then x.roll(half) * sin, one op fewer per use, and exactly equal."""
        freqs = positions[..., None].float() * self.inv_freq.to(positions.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        sin = emb.sin()
        sin = torch.cat((-sin[..., : freqs.shape[-1]], sin[..., freqs.shape[-1]:]), dim=-1)
        return (emb.cos() * self.scale).to(dtype).unsqueeze(-3), (sin * self.scale).to(dtype).unsqueeze(-3)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [..., heads, T, head_dim]; cos/sin from Rotary: x * cos + rotate_half(x) * sin."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin


class Attention(nn.Module):
    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, bias: bool):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.q_proj = nn.Linear(hidden, heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=bias)

    def _split(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        return x.unflatten(-1, (heads, self.head_dim)).transpose(-2, -3)

    def q(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return apply_rope(self._split(self.q_proj(x), self.heads), cos, sin)

    def kv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = apply_rope(self._split(self.k_proj(x), self.kv_heads), cos, sin)
        return k, self._split(self.v_proj(x), self.kv_heads)


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, bias: bool):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.up_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """One LLaMA decoder block, its parameters named as transformers names them."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(
            cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, head_dim, cfg.attention_bias
        )
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias)

    def finish(self, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Residual stream after attention ([..., heads, head_dim] flattened) and the MLP."""
        h = h + self.self_attn.o_proj(attn.flatten(-2))
        return h + self.mlp(self.post_attention_layernorm(h))


class TextModel(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class TextTower(nn.Module):
    """The frozen LLM, laid out as `LlamaForCausalLM` so its safetensors load as they are."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.model = TextModel(cfg)
        self.tied = bool(cfg.tie_word_embeddings)
        if not self.tied:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        weight = self.model.embed_tokens.weight if self.tied else self.lm_head.weight
        return F.linear(self.model.norm(h), weight)


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


@dataclass
class ImageSegment:
    """An image in a sequence: its scaled VAE latent [C, h, w] and its noise level t (0 = clean)."""

    latent: torch.Tensor
    t: float


Segment = list[int] | ImageSegment


@dataclass
class SequenceInputs:
    embeds: torch.Tensor  # [T, D]
    positions: torch.Tensor  # [T]
    image_ids: torch.Tensor  # [T]: index of the image a token belongs to, -1 for text (boi/eoi are text)
    image_slices: list[slice]  # where each image's tokens sit, in order

    @property
    def is_image(self) -> torch.Tensor:
        return self.image_ids >= 0


def attention_mask(image_ids: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """[B, T] image ids -> [B, 1, T, T] bool: causal, except that the tokens of one image see each other."""
    T = image_ids.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=image_ids.device).tril()
    same_image = (image_ids[:, :, None] == image_ids[:, None, :]) & (image_ids[:, :, None] >= 0)
    allowed = causal | same_image
    if valid is not None:  # padding: no query sees a pad key; a pad query sees itself so softmax stays finite
        allowed = (allowed & valid[:, None, :]) | torch.eye(T, dtype=torch.bool, device=image_ids.device)
    return allowed[:, None]


class AttentionFn(Protocol):
    """What the layer loop asks of attention: q [..., Hq, T, d] (None when no query needs it now) and
    k/v [..., Hkv, T, d] in, the output [..., T, Hq, d] out (token-major, so the model can pick its rows)."""

    def keeps(self, tower: str) -> bool:
        """Whether this tower's keys/values are stored for later steps, even with no query now."""

    def __call__(self, tower: str, layer: int, q: torch.Tensor | None, k: torch.Tensor,
                 v: torch.Tensor) -> torch.Tensor | None: ...


class MaskedAttention:
    """Attention over whole sequences with a [B, 1, T, T] bool mask; nothing is cached."""

    def __init__(self, mask: torch.Tensor):
        self.mask = mask

    def keeps(self, tower: str) -> bool:
        return False

    def __call__(self, tower: str, layer: int, q, k, v) -> torch.Tensor | None:
        if q is None:
            return None
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, enable_gqa=True).transpose(-2, -3)


def padded_forward(model: "XFusionModel", h: torch.Tensor, positions: torch.Tensor, image_ids: torch.Tensor,
                   valid: torch.Tensor | None = None) -> torch.Tensor:
    """The full-sequence forward of a padded batch [B, T, D] (training, uncached sampling, tests)."""
    return model(h, positions, image_ids, MaskedAttention(attention_mask(image_ids, valid)))


def pad_sequences(seqs: list["SequenceInputs"]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sequences of different lengths -> right-padded (embeds, positions, image_ids, valid)."""
    T, first = max(len(s.positions) for s in seqs), seqs[0].embeds
    h = first.new_zeros(len(seqs), T, first.shape[-1])
    positions = torch.zeros(len(seqs), T, dtype=torch.long, device=first.device)
    image_ids = torch.full((len(seqs), T), -1, dtype=torch.long, device=first.device)
    valid = torch.zeros(len(seqs), T, dtype=torch.bool, device=first.device)
    for b, s in enumerate(seqs):
        n = len(s.positions)
        h[b, :n], positions[b, :n], image_ids[b, :n], valid[b, :n] = s.embeds, s.positions, s.image_ids, True
    return h, positions, image_ids, valid


class XFusionModel(nn.Module):
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
        """One block over the tokens, returning only the rows whose queries it serves: [N_rows, D]
        (rows None: every token, in h's own shape)."""
        x = block.input_layernorm(h)
        k, v = block.self_attn.kv(x, cos, sin)
        if rows is not None and not rows.any():  # keys/values for later queries only (an image prompt's)
            attention(tower, layer, None, k, v)
            return None
        attn = attention(tower, layer, block.self_attn.q(x, cos, sin), k, v)
        if rows is None:
            return block.finish(h, attn)
        return block.finish(h[rows], attn[rows])

    def requires_grad_vision_only(self) -> "XFusionModel":
        self.text.requires_grad_(False)
        self.vision.requires_grad_(True)
        return self
