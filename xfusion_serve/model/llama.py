"""LLaMA decoder blocks in plain torch, their parameters named as transformers names them.

RMSNorm, RoPE (frequencies from transformers' own rope functions, so llama3 scaling matches exactly),
grouped-query attention and SwiGLU: the frozen text tower is `TextTower` (laid out as `LlamaForCausalLM`, so
its safetensors load as they are), and every vision block of X-Fusion is one more `Block`.
Source followed: transformers' `models/llama/modeling_llama.py`; tests/model/test_model.py holds the logits
to it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

# RoPE types whose frequencies depend on the sequence length at run time; a static cache cannot use them.
_DYNAMIC_ROPE = {"dynamic", "longrope"}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 and cast back before the weight, as transformers' LlamaRMSNorm does (one op
        # instead of five; tests/model/test_model.py holds it to transformers' logits).
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
        self.qkv_weight: torch.Tensor | None = None  # q, k and v in one weight, once fuse() has run
        self.qkv_bias: torch.Tensor | None = None
        self.matmul = F.linear  # (x, weight, bias) -> x @ weight.T + bias; an engine may set a kernel of its own

    def _split(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        return x.unflatten(-1, (heads, self.head_dim)).transpose(-2, -3)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                need_q: bool = True) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """x [..., T, hidden] -> q [..., heads, T, head_dim] (None unless need_q), k and v [..., kv_heads, T,
        head_dim], RoPE applied to q and k. One matrix multiply once `fuse()` has run."""
        if need_q and self.qkv_weight is not None:
            q, k, v = self.matmul(x, self.qkv_weight, self.qkv_bias).split(
                [self.heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim], -1)
        else:
            q, k, v = self.q_proj(x) if need_q else None, self.k_proj(x), self.v_proj(x)
        q = apply_rope(self._split(q, self.heads), cos, sin) if need_q else None
        return q, apply_rope(self._split(k, self.kv_heads), cos, sin), self._split(v, self.kv_heads)

    @torch.no_grad()
    def fuse(self, transposed: bool = False) -> None:
        """For inference: q, k and v projections in one weight, the three parameters becoming views into it (they
        keep their names, no memory is added); `transposed`: that weight and o_proj's stored [in, out] (see
        fuse_linears). Call it after the last move to a device or dtype, and never for training: the views
        share one storage."""
        self.qkv_weight, self.qkv_bias = fuse_linears(self.q_proj, self.k_proj, self.v_proj, transposed=transposed)
        if transposed:
            fuse_linears(self.o_proj, transposed=True)


def fuse_linears(*linears: nn.Linear, transposed: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenates the weights (and biases) of linears that read the same input along their outputs, and
    makes each linear's parameters views into the result. -> (weight [out, in], bias or None).

    `transposed`: the weight's memory laid out [in, out] (the weight a transposed view of it: same values and
    shape). F.linear then runs as a BLAS "NN" multiply instead of "NT", which MKL's float32 sgemm does faster
    for a few rows: all of a demo decode step's multiplies at 16 rows 0.552 -> 0.356 ms on one thread
    (`benchmarks/bench_cpu_linear.py`; README, "Figures")."""
    def fused(tensors: list[torch.Tensor]) -> torch.Tensor:
        whole, start = torch.cat([t.detach() for t in tensors]), 0
        if transposed and whole.dim() == 2:
            whole = whole.t().contiguous().t()
        for lin, t in zip(linears, tensors):
            view = nn.Parameter(whole[start : start + len(t)], requires_grad=False)
            setattr(lin, "weight" if t is lin.weight else "bias", view)
            start += len(t)
        return whole

    weight = fused([lin.weight for lin in linears])
    bias = fused([lin.bias for lin in linears]) if linears[0].bias is not None else None
    return weight, bias


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, bias: bool):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.up_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)
        self.gate_up_weight: torch.Tensor | None = None  # gate and up in one weight, once fuse() has run
        self.gate_up_bias: torch.Tensor | None = None
        self.matmul = F.linear  # as Attention.matmul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_weight is not None:
            gate, up = self.matmul(x, self.gate_up_weight, self.gate_up_bias).chunk(2, -1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.matmul(F.silu(gate) * up, self.down_proj.weight, self.down_proj.bias)

    @torch.no_grad()
    def fuse(self, transposed: bool = False) -> None:
        """For inference: gate and up projections in one weight (see Attention.fuse); `transposed`: that weight
        and down_proj's stored [in, out]."""
        self.gate_up_weight, self.gate_up_bias = fuse_linears(self.gate_proj, self.up_proj, transposed=transposed)
        if transposed:
            fuse_linears(self.down_proj, transposed=True)


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

    def serve_rows(self, h: torch.Tensor, rows: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                   attention, tower: str, layer: int) -> torch.Tensor | None:
        """The block over every token of h [..., T, D], returning only the rows whose queries it serves:
        [N_rows, D] (rows None: every token, in h's shape; no row: None, its keys/values kept by `attention`
        for later queries, as an image prompt's are). One method, so that whatever wraps a block (FSDP's
        unshard, activation checkpointing) wraps all of its use."""
        x = self.input_layernorm(h)
        if rows is not None and not rows.any():
            attention(tower, layer, None, *self.self_attn.project(x, cos, sin, need_q=False)[1:])
            return None
        attn = attention(tower, layer, *self.self_attn.project(x, cos, sin))
        if rows is None:
            return self.finish(h, attn)
        return self.finish(h[rows], attn[rows])

    def finish(self, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Residual stream after attention ([..., heads, head_dim] flattened) and the MLP."""
        o_proj = self.self_attn.o_proj
        h = h + self.self_attn.matmul(attn.flatten(-2), o_proj.weight, o_proj.bias)
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
        self.matmul = F.linear  # as Attention.matmul

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        weight = self.model.embed_tokens.weight if self.tied else self.lm_head.weight
        return self.matmul(self.model.norm(h), weight)
