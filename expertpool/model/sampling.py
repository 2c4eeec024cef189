"""Sampling parameters and batched token sampling (temperature, top-k, top-p, per-request seeds).

``SamplingParams`` is the engine-level request contract shared by in-process generation and the
serving engine; HTTP-level validation (ranges, OpenAI names) happens at the API boundary.
Sampling runs in fp32 on the worker that holds the logits, so logits never cross the network.
Greedy (temperature == 0) is an argmax and is bit-reproducible.
"""

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0          # 0 = greedy
    top_p: float = 1.0                # nucleus mass in (0, 1]
    top_k: int = 0                    # 0 = off
    seed: int | None = None           # per-request RNG; None = nondeterministic
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


def make_generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed if seed is not None else torch.seed())
    return g


def sample(logits_BV: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> list[int]:
    """One token per row. Rows with temperature 0 take the argmax; others sample with their own RNG."""
    logits_BV = logits_BV.float()
    out = logits_BV.argmax(-1).tolist()
    for i, p in enumerate(params):
        if p.temperature == 0:
            continue
        row = logits_BV[i] / p.temperature
        if p.top_k and p.top_k < row.numel():
            kth = torch.topk(row, p.top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        probs = torch.softmax(row, -1)
        if p.top_p < 1.0:
            sp, si = probs.sort(descending=True)
            keep = sp.cumsum(-1) - sp < p.top_p  # always keeps the top token
            sp = sp * keep
            probs = torch.zeros_like(probs).scatter_(0, si, sp)
            probs = probs / probs.sum()
        out[i] = int(torch.multinomial(probs, 1, generator=generators[i]).item())
    return out
