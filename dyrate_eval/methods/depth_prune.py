"""DyRate's ablation baseline whose rate grows with depth."""

import torch

from ..core.policy import PruningPolicy
from ..core.settings import POSITIONS_SETTING, RATE_SETTING, layer_setting


class DepthPrune(PruningPolicy):
    """A rate that grows with depth and holds for the whole generation. Layer l >= K
    drops the share min(1, 2R (l-K+1) / (L-K+1)) of the image tokens (L layers; each
    drop ranked by the previous layer's attention of the last prompt token), so the
    layers >= K drop R on average, as FixedPrune does at each of them (exactly while
    2R (L-K) <= L-K+1; above that the deepest layers drop all)."""

    name = "depth_prune"
    settings = (layer_setting(lambda arch: 2), RATE_SETTING, POSITIONS_SETTING)

    def layer_rate(self, layer: int) -> float:
        return min(1.0, 2 * self.R * (layer - self.K + 1) / (self.num_layers - self.K + 1))

    def keep_before_layer(self, layer, step, view):
        if step == 0 and layer >= self.K:
            return torch.round((1.0 - self.layer_rate(layer)) * view.n_img.double()).long()
        return None
