"""FastV (Chen et al., 2024): drop image tokens once, after an early layer, ranked by
the last prompt token's attention."""

import torch

from ..core.policy import PruningPolicy
from ..core.settings import POSITIONS_SETTING, RATE_SETTING, SELECTION_SETTING, layer_setting


class FastV(PruningPolicy):
    """At prefill, after layer K-1, keep the top (1-R) share of image tokens for all
    layers >= K and for the whole generation. ``selection=random`` keeps a random set
    of the same size instead (a control for the attention ranking)."""

    name = "fastv"
    settings = (layer_setting(lambda arch: 2), RATE_SETTING, SELECTION_SETTING, POSITIONS_SETTING)

    def __init__(self, arch, values):
        super().__init__(arch, values)
        # seeded once per model: a rerun of the same requests drops the same tokens
        self._random = torch.Generator().manual_seed(0)

    def keep_before_layer(self, layer, step, view):
        if step == 0 and layer == self.K:
            return torch.round((1.0 - self.R) * view.n_img.double()).long()
        return None

    def score(self, signals):
        if self.selection == "random":
            return torch.rand(signals.candidates.shape, generator=self._random).to(signals.candidates.device)
        return signals.attention()
