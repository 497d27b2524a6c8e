"""DyRate's ablation baseline with one rate at every step."""

import torch

from ..core.policy import PruningPolicy
from ..core.settings import MODE_SETTING, POSITIONS_SETTING, RATE_SETTING, layer_setting


class FixedPrune(PruningPolicy):
    """One rate R at every step, applied at layer K as DyRate applies its rates.
    Progressive, the prefill's selection holds (FastV at the same K and R); with
    mode=mask every step keeps the top share by its own attention."""

    name = "fixed_prune"
    settings = (layer_setting(lambda arch: 2), RATE_SETTING, MODE_SETTING, POSITIONS_SETTING)

    @property
    def progressive(self) -> bool:
        return self.mode == "progressive"

    def keep_before_layer(self, layer, step, view):
        if layer == self.K and (step == 0 or not self.progressive):
            return torch.round((1.0 - self.R) * view.n_img.double()).long()
        return None
