"""Next-token sampling: greedy at temperature 0, else temperature, top-k, top-p, per request.

Each request draws from its own generator, so a seeded request gives the same text alone or batched.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# Below this temperature sampling is greedy decoding: logits / 1e-300 overflow to inf and softmax to NaN.
GREEDY_BELOW = 1e-5
MAX_LOGPROBS = 20


@dataclass
class TokenLogprobs:
    """A generated token's log-probability and the `logprobs` likeliest tokens' (id, log-probability), best
    first. Natural log, of the model's own distribution (the logits before temperature, top-k and top-p, as
    vLLM reports them by default)."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


def token_logprobs(logits: torch.Tensor, tokens: list[int], counts: list[int]) -> list[TokenLogprobs]:
    """logits [B, V] of the rows that asked, the token chosen in each, how many alternatives each wants."""
    logp = logits.float().log_softmax(-1)
    chosen = logp.gather(-1, torch.tensor(tokens, device=logp.device)[:, None])[:, 0].tolist()
    k = max(counts)
    top = logp.topk(k, dim=-1) if k else None
    out = []
    for b, (token, count) in enumerate(zip(tokens, counts)):
        alternatives = [] if top is None else list(zip(top.indices[b, :count].tolist(), top.values[b, :count].tolist()))
        out.append(TokenLogprobs(token, chosen[b], alternatives))
    return out


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
    logprobs: int | None = None  # None: none; k: each chosen token's log-probability and the k likeliest

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must lie in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must lie in [0, {MAX_LOGPROBS}]")

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
