"""VTW, visual-token withdrawal (Lin et al., 2025): past layer K no image tokens at all."""

import torch

from ..core.policy import PruningPolicy
from ..core.settings import POSITIONS_SETTING, layer_setting


class VTW(PruningPolicy):
    """Layers >= K see no image tokens, in prefill and decode.

    The default K is half the depth: 16 of 32 layers (7B) and 20 of 40 (13B), VTW's
    published choices for LLaVA-1.5.
    """

    name = "vtw"
    settings = (layer_setting(lambda arch: arch.layers // 2), POSITIONS_SETTING)

    def keep_before_layer(self, layer, step, view):
        if step == 0 and layer == self.K:
            return torch.zeros_like(view.n_img)
        return None
