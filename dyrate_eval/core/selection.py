"""The selection rules shared by the executor, the plan simulation and DyRate's
training: how many image tokens a step keeps once the core's limits apply to what the
policy asked for, and which ones, given their scores."""

from __future__ import annotations

import torch

from .layout import on_device
from .policy import PruningPolicy


def applied_keep(policy: PruningPolicy, asked: torch.Tensor, kept_now: torch.Tensor,
                 present: torch.Tensor) -> torch.Tensor | None:
    """The count applied (B,) where ``policy`` asked to keep ``asked`` (B,) image tokens
    (``keep_before_layer``), or None where nothing changes. A progressive policy only
    drops, from the ``kept_now`` (B,) image tokens still seen; one that re-selects at
    every step chooses among all ``present`` (B,) image tokens of the prompt."""
    limit = kept_now if policy.progressive else present
    keep = torch.minimum(on_device(asked, limit.device), limit)
    if policy.progressive and torch.equal(keep, kept_now):
        return None
    return keep


def top_slots(scores: torch.Tensor, candidates: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(B, N) bool: per row, the ``keep`` (B,) candidates with the highest ``scores``
    (B, N); ties go to the lower slot."""
    scores = scores.masked_fill(~candidates, float("-inf"))
    order = scores.argsort(dim=1, descending=True, stable=True)
    positions = torch.arange(order.shape[1], device=order.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, positions)
    return (rank < keep[:, None]) & candidates
