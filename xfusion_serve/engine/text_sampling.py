"""Next-token sampling: greedy at temperature 0, else temperature, top-k, top-p, per request.

Each request draws from its own generator, so a seeded request gives the same text alone or batched.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# Below this temperature sampling is greedy decoding: logits / 1e-300 overflow to inf and softmax to NaN.
GREEDY_BELOW = 1e-5


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no limit
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must lie in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")

    def generator(self) -> torch.Generator:
        g = torch.Generator()
        if self.seed is None:
            g.seed()
        else:
            g.manual_seed(self.seed)
        return g


def sample_next(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> list[int]:
    """logits [B, V] -> one token id per row."""
    logits = logits.float()
    out = logits.argmax(-1).tolist()
    for b, (p, g) in enumerate(zip(params, generators)):
        if p.temperature < GREEDY_BELOW:
            continue
        row = logits[b] / p.temperature
        if p.top_k:
            kth = torch.topk(row, min(p.top_k, row.numel())).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        probs = row.softmax(-1)
        if p.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            # Keep the smallest set whose mass reaches top_p; the first token always stays, even for a
            # top_p so small that it is 0 in float32.
            drop = sorted_p.cumsum(-1) - sorted_p >= p.top_p
            drop[0] = False
            probs = probs.scatter(0, order, sorted_p.masked_fill(drop, 0.0))
        out[b] = int(torch.multinomial(probs.cpu(), 1, generator=g))
    return out
