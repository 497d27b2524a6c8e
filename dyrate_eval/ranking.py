"""The selection rule shared by the executor and DyRate's training: which image tokens
a step keeps, given their scores, the candidates and a keep count."""

from __future__ import annotations

import torch


def top_slots(scores: torch.Tensor, candidates: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(B, N) bool: per row, the ``keep`` (B,) candidates with the highest ``scores``
    (B, N); ties go to the lower slot."""
    scores = scores.masked_fill(~candidates, float("-inf"))
    order = scores.argsort(dim=1, descending=True, stable=True)
    positions = torch.arange(order.shape[1], device=order.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, positions)
    return (rank < keep[:, None]) & candidates
