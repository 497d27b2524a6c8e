"""DART (Wen et al., 2025, "Stop Looking for Important Tokens in Multimodal Language
Models: Duplication Matters More", arXiv 2502.11494): keep the image tokens that
duplicate a few pivot tokens least, instead of those that look important."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..arch import Arch
from ..core.policy import PruningPolicy
from ..core.selection import top_slots
from ..core.settings import POSITIONS_SETTING, Setting, choice_setting, layer_setting, rate_setting
from ..errors import PruningConfigError


def _default_pivots(arch: Arch) -> int:
    """DART's 8 pivots for LLaVA-1.5's 576 image tokens, scaled to the model's."""
    return max(1, round(8 * arch.n_img / 576))


def _parse_pivots(value: Any, arch: Arch) -> int:
    try:
        number = float(value) if not isinstance(value, bool) and isinstance(value, (int, float, str)) else None
    except ValueError:
        number = None
    if number is None or not number.is_integer() or not 1 <= number <= arch.n_img:
        raise PruningConfigError(
            f"pivots={value!r} is not allowed for method 'dart': pivots must be an integer in 1..{arch.n_img}, "
            "the model's image tokens"
        )
    return int(number)


SIMILARITIES = ("keys", "hidden")


class DART(PruningPolicy):
    """At the prefill, before layer K, keep round((1-R) N) image tokens for all layers >= K
    and the whole generation: the ``pivots`` image tokens whose keys at layer K-1 have the
    largest L1 norm, and, each pivot in turn taking an equal share of the rest, the
    remaining image tokens least similar to it (cosine of the keys at layer K-1, or with
    ``similarity=hidden`` of the hidden states entering layer K). Needs no attention map.

    Reconstructed from the paper and its LLaVA-1.5 code (K=2, 128 of 576 image tokens
    kept: R=0.778; 4 pivots from the image and 4 from the instruction, by the L1 norm of
    their keys; each pivot then takes 16 tokens least similar to it, by the cosine of the
    final-normed hidden states). Where this differs:
    - all pivots come from the image tokens (8 for 576, scaled to the model's count): the
      ranking signals hold the image tokens alone;
    - the similarity is that of the keys by default (post-rotary, as cached: their
      rotation depends on the position, the hidden states' does not); ``similarity=hidden``
      takes the hidden states, without the final norm's weights;
    - exactly round((1-R) N) tokens are kept, the pivots among them; the code keeps its
      image pivots on top of 128.
    """

    name = "dart"
    settings = (
        layer_setting(lambda arch: 2),
        rate_setting(0.778),
        Setting("pivots", "an integer in 1..the image tokens", _parse_pivots, _default_pivots),
        choice_setting("similarity", SIMILARITIES, "keys"),
        POSITIONS_SETTING,
    )

    def __init__(self, arch, values):
        super().__init__(arch, values)
        kept = int(self.kept_count(torch.tensor([arch.n_img]))[0])
        if self.pivots > kept:
            raise PruningConfigError(
                f"pivots={self.pivots} is not allowed for method 'dart' with R={self.R}: the pivots are among the kept "
                f"image tokens, and R={self.R} keeps {kept} of the model's {arch.n_img}"
            )

    def kept_count(self, n_img: torch.Tensor) -> torch.Tensor:
        return torch.round((1.0 - self.R) * n_img.double()).long()

    def keep_before_layer(self, layer, step, view):
        if step == 0 and layer == self.K:
            return self.kept_count(view.n_img)
        return None

    def score(self, signals):
        # (B, N, kv_heads * head_dim): each token's key over all heads
        keys = signals.keys().transpose(1, 2).flatten(2).float()
        candidates = signals.candidates
        keep = self.kept_count(candidates.sum(1))
        # a prompt with fewer image tokens than the model's may keep fewer than the pivots
        pivot_counts = keep.clamp(max=self.pivots)
        pivots = top_slots(keys.norm(p=1, dim=-1), candidates, pivot_counts)
        pivot_slots = pivots.to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, : self.pivots]
        features = F.normalize(keys if self.similarity == "keys" else signals.hidden().float(), dim=-1)
        pivot_features = features.gather(1, pivot_slots[..., None].expand(-1, -1, features.shape[-1]))
        # a matrix product, as FLOPs count it: (B, N, pivots) cosines
        similarity = features @ pivot_features.transpose(1, 2)
        signals.add_flops(2 * candidates.sum(1) * features.shape[-1] * self.pivots)
        kept = pivots.clone()
        chosen_by_pivots = keep - pivot_counts
        for pivot in range(self.pivots):
            share = chosen_by_pivots // self.pivots + (pivot < chosen_by_pivots % self.pivots)
            kept |= top_slots(-similarity[..., pivot], candidates & ~kept, share)
        return kept.float()  # exactly ``keep`` of them: the core keeps those
