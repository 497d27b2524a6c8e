"""PruMerge and PruMerge+ (Shang et al., 2024, "LLaVA-PruMerge: Adaptive Token Reduction
for Efficient Large Multimodal Models", arXiv 2403.15388): before the decoder, keep the
image tokens the vision tower's class token attends to as outliers, each absorbing its
most similar tokens weighted by the class token's attention.

Reconstructed from the paper and its public description: the kept tokens are the patches
whose class-token attention lies above Q3 + 1.5 IQR of the image's patches (so their
number varies from image to image); each kept token's feature becomes its own plus the
sum of its ``neighbours`` most similar other patches' features (cosine of keys), each
weighted by the class token's attention on it. PruMerge+ (``plus=true``) also keeps a
spatially even sample of patches, every ``1/(3 ratio)``-th from ``1/(6 ratio)`` on, ratio
being the outliers' share. Differences: PruMerge takes the class token's attention and
the keys from the tower's last layer, as one head over the full width, and appends one
more token (the attention-weighted sum of the pruned patches); this core reads the
feature layer's attention averaged over heads and its keys averaged over heads, and
keeps patches only.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..arch import Arch
from ..core.policy import ImageReduction, PruningPolicy
from ..core.settings import Setting

# PruMerge merges each kept token with its 32 nearest of LLaVA-1.5's 576 patches
NEIGHBOURS_SHARE = 32 / 576


def _parse_flag(value: Any, arch: Arch) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "false"):
        return str(value).lower() == "true"
    raise ValueError


def _parse_neighbours(value: Any, arch: Arch) -> int:
    if isinstance(value, bool):
        raise ValueError
    number = float(value)
    if not number.is_integer() or not 0 <= number < arch.n_img:
        raise ValueError
    return int(number)


class PruMerge(PruningPolicy):
    """Before layer 0, the class token's outlier patches (plus, with ``plus=true``, an
    even spatial sample) enter the decoder, each having merged its nearest patches."""

    name = "prumerge"
    settings = (
        Setting("plus", "true or false", _parse_flag, lambda arch: False),
        Setting("neighbours", "a whole number of patches in 0..n_img-1", _parse_neighbours,
                lambda arch: max(1, round(NEIGHBOURS_SHARE * arch.n_img))),
    )
    reduces_before_decoder = True

    def observes(self, layer, step):
        return layer == 0 and step == 0  # how many it keeps follows from each image's attention

    def reduce_before_decoder(self, signals):
        attention = signals.cls_attention()  # (B, N)
        batch, slots = attention.shape
        low, high = torch.quantile(attention, torch.tensor([0.25, 0.75], device=attention.device), dim=1)
        kept = attention > (high + 1.5 * (high - low))[:, None]
        if self.plus:
            kept = kept | self._spatial_sample(kept)
        keys = F.normalize(signals.keys(), dim=-1)  # (B, N, head_dim)
        similarity = torch.matmul(keys, keys.transpose(1, 2))  # (B, N, N)
        signals.add_flops(2 * slots * slots * keys.shape[-1])
        similarity.diagonal(dim1=1, dim2=2).fill_(float("-inf"))  # the others, not itself
        nearest = similarity.topk(self.neighbours, dim=-1).indices  # (B, N, neighbours)
        weights = torch.zeros(batch, slots, slots, device=attention.device)
        weights.scatter_(2, nearest, attention[:, None, :].expand(-1, slots, -1).gather(2, nearest))
        weights.diagonal(dim1=1, dim2=2).fill_(1.0)
        return ImageReduction(kept, weights)

    @staticmethod
    def _spatial_sample(outliers: torch.Tensor) -> torch.Tensor:
        """(B, N) PruMerge+'s even sample: with ratio the outliers' share of the patches,
        every int(int(1/ratio)/3)-th patch from int(int(1/ratio)/6) on."""
        slots = outliers.shape[1]
        sample = torch.zeros_like(outliers)
        for row, count in enumerate(outliers.sum(1).tolist()):
            stride = int(slots / max(count, 1))  # int(1 / ratio)
            sample[row, torch.arange(stride // 6, slots - 1, max(1, stride // 3))] = True
        return sample
