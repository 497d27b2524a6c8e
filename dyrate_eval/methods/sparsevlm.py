"""SparseVLM (Zhang et al., 2024, "SparseVLM: Visual Token Sparsification for Efficient
Vision-Language Model Inference", arXiv 2410.04417): text-guided pruning in stages inside
the decoder, with the deleted tokens recycled.

Reconstructed from the paper and public descriptions of its LLaVA-1.5 setting: at three
stages (before layers 3, 7 and 16 of 32, scaled to the model's depth) the image tokens
still kept are rated by the instruction tokens most engaged with the image (the raters:
those whose attention on the image, at the layer before, is above the instruction's
mean); each image token's relevance is the raters' mean attention on it. The stage keeps
its budget of the most relevant tokens (for 192 tokens on average: 300, 200 and 110 of
576; for 128: 303, 110, 36; for 64: 66, 30, 17; scaled to the model's image tokens), and
recycles the 30% most relevant of the deleted ones (one more): they are grouped into a
tenth as many clusters (one more) by density peaks on their hidden states, and each
cluster lives on as one token, its centre, carrying the cluster's mean state. The tokens
left are numbered contiguously (positions=renumber, its convention).
Differences: SparseVLM picks its raters by the embeddings' similarity to the image
before layer 0 and appends the recycled tokens as new tokens after the kept ones; this
core picks them by attention at each stage and keeps the recycled states in the
centres' own slots (with their own positions), since a policy keeps or merges tokens
and never adds one.
"""

from __future__ import annotations

from typing import Any

import torch

from ..arch import Arch
from ..core.policy import PruningPolicy, Ranking
from ..core.settings import Setting, positions_setting

# per budget, the image tokens each stage keeps, of LLaVA-1.5's 576
STAGE_BUDGETS = {64: (66, 30, 17), 128: (303, 110, 36), 192: (300, 200, 110)}
# the stages start before these of LLaVA-1.5-7B's 32 layers
STAGE_LAYERS = (3, 7, 16)
RECYCLED_SHARE = 0.3
TOKENS_PER_CLUSTER = 10


def _parse_budget(value: Any, arch: Arch) -> int:
    if isinstance(value, bool) or int(value) not in STAGE_BUDGETS or float(value) != int(value):
        raise ValueError
    return int(value)


def _parse_layers(value: Any, arch: Arch) -> tuple[int, ...]:
    layers = tuple(int(part) for part in (value.split("/") if isinstance(value, str) else value))
    if len(layers) != len(STAGE_LAYERS) or list(layers) != sorted(set(layers)) or not 1 <= layers[0] <= layers[-1] < arch.layers:
        raise ValueError
    return layers


def _default_layers(arch: Arch) -> tuple[int, ...]:
    """LLaVA-1.5's stage layers scaled to the depth, each at least one past the one before."""
    layers = []
    for layer in STAGE_LAYERS:
        layers.append(max(round(layer * arch.layers / 32), layers[-1] + 1 if layers else 1))
    return _parse_layers(layers, arch)


class SparseVLM(PruningPolicy):
    """Three text-guided stages at the prefill, each keeping its budget of image tokens
    plus the centres of the recycled ones."""

    name = "sparsevlm"
    settings = (
        Setting("tokens", "64, 128 or 192 (image tokens on average, of 576)", _parse_budget, lambda arch: 192),
        Setting("layers", "three increasing layers in 1..num_layers-1 separated by '/'", _parse_layers, _default_layers),
        positions_setting("renumber"),  # SparseVLM numbers the tokens it keeps contiguously
    )

    def keep_before_layer(self, layer, step, view):
        if step != 0 or layer not in self.layers:
            return None
        budget, _, clusters = self._stage(self.layers.index(layer), view.n_img)
        return budget + clusters

    def _stage(self, stage: int, n_img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(budget, recycled, clusters) per sample at ``stage``, from its image tokens."""
        candidates = n_img
        for index in range(stage + 1):
            share = STAGE_BUDGETS[self.tokens][index] / 576
            budget = torch.minimum(torch.round(share * n_img.double()).long(), candidates)
            deleted = candidates - budget
            recycled = torch.where(deleted > 0, (RECYCLED_SHARE * deleted.double()).long() + 1, 0)
            clusters = torch.where(recycled > 0, recycled // TOKENS_PER_CLUSTER + 1, 0)
            candidates = budget + clusters
        return budget, recycled, clusters

    def score(self, signals):
        weights, valid = signals.instruction_attention()  # (B, T, N), (B, T)
        on_image = weights.sum(-1)
        mean = (on_image * valid).sum(1) / valid.sum(1).clamp_min(1)
        raters = valid & (on_image > mean[:, None])
        relevance = (weights * raters[..., None]).sum(1) / raters.sum(1).clamp_min(1)[:, None]  # (B, N)
        candidates = signals.candidates
        budget, recycled, clusters = self._stage(self.layers.index(signals.layer), candidates.sum(1))
        relevance = relevance.masked_fill(~candidates, float("-inf"))
        order = relevance.argsort(dim=1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
        chosen = rank < budget[:, None]
        merged = order[:, int(budget.max()): int((budget + recycled).max())]  # (B, m): the recycled, by relevance
        centres, members = self._clusters(signals, merged, int(clusters.max()))
        slots = relevance.shape[1]
        merge_weights = torch.eye(slots, device=relevance.device).repeat(relevance.shape[0], 1, 1)
        rows = torch.arange(relevance.shape[0], device=relevance.device)[:, None]
        is_centre = torch.zeros_like(chosen).scatter_(1, centres, True)
        counts = torch.zeros(relevance.shape[0], slots, device=relevance.device).scatter_add_(
            1, members, torch.ones_like(members, dtype=torch.float32))
        merge_weights[rows, members, merged] = 1.0 / counts.gather(1, members)  # a centre: its cluster's mean
        return Ranking(relevance.clamp_min(0) + 2.0 * chosen + 1.0 * is_centre, merge_weights)

    @staticmethod
    def _clusters(signals, merged: torch.Tensor, clusters: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Density-peak clustering of the ``merged`` slots' hidden states (B, m): the
        centre slots (B, clusters) and, per merged slot, its centre's slot (B, m)."""
        if clusters == 0:
            return merged[:, :0], merged
        states = signals.hidden().float()
        x = states.gather(1, merged[..., None].expand(-1, -1, states.shape[-1]))  # (B, m, D)
        gram = torch.matmul(x, x.transpose(1, 2))
        signals.add_flops(2 * x.shape[1] * x.shape[1] * x.shape[2])
        squares = gram.diagonal(dim1=1, dim2=2)
        distance = (squares[:, :, None] + squares[:, None, :] - 2 * gram).clamp_min(0).sqrt() / x.shape[2] ** 0.5
        nearest = distance.topk(min(clusters, x.shape[1]), dim=-1, largest=False).values
        density = (-(nearest**2).mean(-1)).exp()  # (B, m)
        denser = density[:, None, :] > density[:, :, None]  # [b, i, j]: j is denser than i
        farthest = distance.amax(dim=(1, 2), keepdim=True).expand_as(distance)
        separation = torch.where(denser, distance, farthest).amin(-1)
        centre_index = (separation * density).topk(clusters, dim=-1).indices  # (B, clusters), into the m
        nearest_centre = distance.gather(1, centre_index[..., None].expand(-1, -1, x.shape[1])).argmin(1)  # (B, m)
        nearest_centre.scatter_(1, centre_index, torch.arange(clusters, device=x.device).expand_as(centre_index))
        centres = merged.gather(1, centre_index)
        return centres, centres.gather(1, nearest_centre)
