"""VisionZip (Yang et al., 2024, "VisionZip: Longer is Better but Not Necessary in Vision
Language Models", arXiv 2412.04467): before the decoder, keep the dominant image tokens
(the most attended by the vision tower's class token) and a few contextual tokens that
absorb the rest by key similarity.

Reconstructed from the paper and its public description: dominant tokens are the top
patches by the class token's attention at the feature layer (summed over heads);
the remaining patches are split, in order, into evenly spaced targets and the others,
each other joins its most similar target (cosine of the feature layer's keys averaged
over heads), and a target's token becomes its own feature plus the mean of the features
that joined it. Differences: VisionZip counts the class token among the dominant ones
and works on the vision features before the projector; LLaVA-1.5 drops the class token
and this core selects and merges the projector's output, so every kept token is a patch
and the merged features are projected first, averaged after.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..arch import Arch
from ..core.policy import ImageReduction, PruningPolicy
from ..core.settings import Setting
from ..errors import PruningConfigError

# VisionZip's LLaVA-1.5 settings keep 64, 128 or 192 of 576 tokens, 54:10 dominant to
# contextual in each; the defaults are its 192, scaled to the model's image tokens
TOKENS_SHARE = 192 / 576
CONTEXTUAL_SHARE = 10 / 64


def _parse_count(value: Any, arch: Arch) -> int:
    if isinstance(value, bool):
        raise ValueError
    number = float(value)
    if not number.is_integer() or not 0 <= number <= arch.n_img:
        raise ValueError
    return int(number)


class VisionZip(PruningPolicy):
    """Before layer 0, ``tokens`` image tokens enter the decoder: ``tokens - contextual``
    dominant ones and ``contextual`` ones that merged the rest."""

    name = "visionzip"
    settings = (
        Setting("tokens", "a whole number of image tokens in 1..n_img", _parse_count,
                lambda arch: max(1, round(TOKENS_SHARE * arch.n_img))),
        Setting("contextual", "a whole number of contextual tokens in 0..tokens", _parse_count, lambda arch: None),
    )
    reduces_before_decoder = True

    def __init__(self, arch, values):
        super().__init__(arch, values)
        if self.contextual is None:
            self.contextual = round(CONTEXTUAL_SHARE * self.tokens)
        if self.tokens < 1 or self.contextual > self.tokens:
            raise PruningConfigError(
                f"tokens={self.tokens}, contextual={self.contextual} are not allowed for method 'visionzip': tokens must "
                f"be in 1..{arch.n_img} (the model's image tokens) and contextual in 0..tokens"
            )

    def reduce_before_decoder(self, signals):
        dominant_count = self.tokens - self.contextual
        attention = signals.cls_attention()  # (B, N)
        batch, slots = attention.shape
        order = attention.argsort(dim=1, descending=True, stable=True)
        dominant = torch.zeros_like(attention, dtype=torch.bool).scatter_(1, order[:, :dominant_count], True)
        if self.contextual == 0:
            return ImageReduction(dominant)
        # the remaining slots in order; every step-th of them is a target (VisionZip's spacing)
        remaining = torch.sort(dominant.to(torch.int8), dim=1, stable=True).indices[:, : slots - dominant_count]
        step = max(1, remaining.shape[1] // self.contextual)
        is_target = torch.zeros(remaining.shape[1], dtype=torch.bool, device=attention.device)
        is_target[torch.arange(0, remaining.shape[1], step, device=attention.device)[: self.contextual]] = True
        targets, others = remaining[:, is_target], remaining[:, ~is_target]
        keys = F.normalize(signals.keys(), dim=-1)  # (B, N, head_dim)

        def keys_of(slots: torch.Tensor) -> torch.Tensor:
            return keys.gather(1, slots[..., None].expand(-1, -1, keys.shape[-1]))

        similarity = torch.matmul(keys_of(others), keys_of(targets).transpose(1, 2))  # (B, others, targets)
        signals.add_flops(2 * others.shape[1] * targets.shape[1] * keys.shape[-1])
        joined = F.one_hot(similarity.argmax(-1), targets.shape[1]).to(attention.dtype)  # (B, others, targets)
        share = joined / joined.sum(1, keepdim=True).clamp_min(1)  # each target: the mean of what joined it
        weights = torch.eye(slots, device=attention.device).repeat(batch, 1, 1)  # every kept token keeps its own
        rows = torch.arange(batch, device=attention.device)[:, None, None]
        weights[rows, targets[:, :, None], others[:, None, :]] = share.transpose(1, 2)
        kept = dominant.scatter(1, targets, True)
        return ImageReduction(kept, weights)
