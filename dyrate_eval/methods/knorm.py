"""Key-norm ranking: FastV's schedule, but the image tokens kept are those whose keys
have the smallest L2 norm, which draw the most attention (Devoto et al., 2024, "A
Simple and Effective L2 Norm-Based Strategy for KV Cache Compression"; NVIDIA kvpress's
KnormPress). It needs no attention map, so any attention kernel serves. Also the worked
example of docs/adding-a-method.md: a method with its own ranking signal."""

import torch

from ..core.policy import PruningPolicy
from ..core.settings import POSITIONS_SETTING, RATE_SETTING, layer_setting


class KeyNorm(PruningPolicy):
    """At prefill, before layer K, keep the (1-R) share of image tokens whose keys at
    layer K-1 have the smallest norm (averaged over key-value heads), for all layers >= K."""

    name = "knorm"
    settings = (layer_setting(lambda arch: 2), RATE_SETTING, POSITIONS_SETTING)

    def keep_before_layer(self, layer, step, view):
        if step == 0 and layer == self.K:
            return torch.round((1.0 - self.R) * view.n_img.double()).long()
        return None

    def score(self, signals):
        return -signals.keys().norm(dim=-1).mean(1)
