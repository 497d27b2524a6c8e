"""PyramidDrop (Xing et al., 2025, "PyramidDrop: Accelerating Your Large Vision-Language
Models via Pyramid Visual Redundancy Reduction", arXiv 2410.17247): the decoder split
into stages, a share of the image tokens dropped at the end of each."""

from __future__ import annotations

from typing import Any

import torch

from ..arch import Arch
from ..core.policy import PruningPolicy
from ..core.settings import Setting, parse_layer, positions_setting


def _quarter_points(arch: Arch) -> tuple[int, ...]:
    """Stage ends at a quarter, half and three quarters of the depth (rounded): 8/16/24
    of LLaVA-1.5-7B's 32 layers, PyramidDrop's setting, and 10/20/30 of 13B's 40."""
    return tuple(sorted({(quarter * arch.layers + 2) // 4 for quarter in (1, 2, 3)} & set(range(1, arch.layers))))


def _parse_stage_layers(value: Any, arch: Arch) -> tuple[int, ...]:
    """Layers separated by '/' (lmms-eval splits model_args at commas), a list, or one layer."""
    parts = value.split("/") if isinstance(value, str) else value if isinstance(value, (list, tuple)) else [value]
    layers = tuple(parse_layer(part, arch) for part in parts)
    if not layers or any(later <= earlier for earlier, later in zip(layers, layers[1:])):
        raise ValueError
    return layers


def _parse_share(value: Any, arch: Arch) -> float:
    if isinstance(value, bool):
        raise ValueError
    share = float(value)
    if not 0.0 < share <= 1.0:  # also refuses NaN
        raise ValueError
    return share


class PyramidDrop(PruningPolicy):
    """At the prefill, before each stage layer (``layers``, default 8/16/24 of 32, scaled to
    the depth), keep the top ``lambda`` share of the image tokens still kept, ranked by the
    last prompt token's attention at the layer before (the last of the stage ending); the
    drops hold for the whole generation. Positions are renumbered by default (PyramidDrop's
    convention): each stage sees its tokens numbered contiguously.

    Reconstructed from the paper and its LLaVA-1.5 evaluation scripts (layers 8/16/24,
    lambda 0.5: 288, 144, 72 of 576 image tokens kept). Where this differs:
    - the ranking attention is the scoring row of the last layer of the ending stage, from
      its own query and cached keys; PyramidDrop's code projects the query and keys of the
      next stage's first layer on its input (one more layer's keys of every token);
    - stage s keeps round(lambda^s N) tokens; the code truncates (int) instead, the same
      counts for 576 tokens and lambda 0.5.
    """

    name = "pdrop"
    settings = (
        Setting("layers", "layer indices in 1..num_layers-1, increasing, separated by '/' (e.g. 8/16/24)",
                _parse_stage_layers, _quarter_points),
        Setting("lambda", "a number in (0, 1]", _parse_share, lambda arch: 0.5),
        positions_setting("renumber"),
    )

    def keep_before_layer(self, layer, step, view):
        if step == 0 and layer in self.layers:
            stage = self.layers.index(layer) + 1
            share = getattr(self, "lambda") ** stage  # a keyword: no self.lambda
            return torch.round(share * view.n_img.double()).long()
        return None
