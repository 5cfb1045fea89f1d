"""Next-token selection as small pure functions on logits [B,V] (no host synchronisation, static shapes).

Order of application (as in transformers' logits processors): repetition penalty → temperature → top-k → top-p →
min-p → sample. Temperature 0 means greedy (argmax of the penalised logits). Filters set removed entries to -inf and
always keep the most likely token, so a row never becomes all -inf.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hybridctl.config import HybridctlError

Tensor = torch.Tensor


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off
    repetition_penalty: float = 1.0  # 1: off (> 1 discourages tokens already in the prompt or output)

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise HybridctlError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise HybridctlError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise HybridctlError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise HybridctlError(f"min_p must be in [0, 1), got {self.min_p}")
        if not self.repetition_penalty > 0:
            raise HybridctlError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL-style penalty (transformers' RepetitionPenaltyLogitsProcessor): for tokens marked in ``seen`` [B,V] bool,
    positive logits are divided by ``penalty`` and negative ones multiplied by it."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def apply_top_k(logits: Tensor, k: int) -> Tensor:
    """Keep the k largest logits per row (ties at the k-th value are kept)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: Tensor, p: float) -> Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability mass reaches p."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # mass of the strictly more likely tokens
    drop_sorted = mass_before >= p  # the first token always has mass_before 0 and stays
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def apply_min_p(logits: Tensor, min_p: float) -> Tensor:
    """Drop tokens whose probability is below min_p × the most likely token's probability."""
    if min_p <= 0.0:
        return logits
    logp = torch.log_softmax(logits.float(), dim=-1)
    threshold = logp.max(dim=-1, keepdim=True).values + math.log(min_p)
    return logits.masked_fill(logp < threshold, float("-inf"))


def sample(logits: Tensor, params: SamplingParams, *, seen: Tensor | None = None,
           generator: torch.Generator | None = None) -> Tensor:
    """logits [B,V] → next ids [B] (long). Sampling draws Exp(1) noise and takes argmax(p / noise) (equivalent to
    multinomial sampling, without the host synchronisation torch.multinomial can cause); reproducible per generator."""
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return torch.argmax(logits, dim=-1)
    logits = logits.float() / params.temperature
    logits = apply_min_p(apply_top_p(apply_top_k(logits, params.top_k), params.top_p), params.min_p)
    probs = torch.softmax(logits, dim=-1)
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return torch.argmax(probs / noise, dim=-1)
