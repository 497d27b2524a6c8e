"""Merging as a core operation: kept tokens absorb dropped ones, weighted. Used before
the decoder (VisionZip's contextual tokens, PruMerge's neighbours)."""

from __future__ import annotations

import torch

from .layout import compact, gather_rows


def merge_features(features: torch.Tensor, kept: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(features with every kept slot's feature replaced by its combination, FLOPs per row).

    ``features`` (B, N, D); ``kept`` (B, N) bool; ``weights`` (B, N, N): row i holds the
    coefficients of slot i's new feature over every slot's feature (its own included;
    an average when they sum to one; rows of dropped slots are not read). The
    combinations are one matrix product over the kept rows: 2 x kept x N x D
    multiply-adds per sample, as a batch-1 run computes them."""
    local, valid = compact(kept)  # (B, K): the kept slots, front-padded
    rows = gather_rows(weights, local) * valid[..., None]  # (B, K, N)
    merged = torch.matmul(rows.to(features.dtype), features)  # (B, K, D)
    out = features.clone()
    batch_rows = torch.arange(features.shape[0], device=features.device)[:, None].expand_as(local)
    out[batch_rows[valid], local[valid]] = merged[valid]
    return out, merge_flops(kept.sum(1), features.shape[1], features.shape[2])


def merge_flops(kept, slots: int, width: int):
    """The FLOPs of merging ``kept`` slots, each a combination of ``slots`` features of
    ``width``: one multiply-add per coefficient and feature element."""
    return 2 * kept * slots * width
