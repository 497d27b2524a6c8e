"""DyRate: a learned predictor picks the pruning rate anew at every generation step
(the predictor and its training live in ``dyrate_eval/dyrate/``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..arch import Arch
from ..core.policy import PruningPolicy
from ..core.settings import MODE_SETTING, POSITIONS_SETTING, Setting
from ..dyrate.predictor import RatePredictor
from ..embedded import EMBEDDED_MODEL_DIR, EMBEDDED_PREDICTOR
from ..errors import PruningConfigError


def _parse_predictor(value: Any, arch: Arch) -> RatePredictor:
    """A predictor folder, or a predictor already built (the bench's random one)."""
    predictor = value if isinstance(value, RatePredictor) else RatePredictor.load(value)
    predictor.check_fits(arch, predictor.source if isinstance(value, RatePredictor) else str(value))
    return predictor


def _default_predictor(arch: Arch) -> RatePredictor:
    """The predictor shipped with the embedded model; every other model needs its own."""
    if arch.name and Path(arch.name).resolve() == EMBEDDED_MODEL_DIR.resolve():
        return _parse_predictor(EMBEDDED_PREDICTOR, arch)
    raise PruningConfigError(
        f"method 'dyrate' needs predictor=DIR: no trained predictor ships for {arch.name or 'this model'}; "
        f"train one with `dyrate-eval train-predictor --pretrained {arch.name or 'MODEL'} --out DIR` "
        "and pass predictor=DIR"
    )


PREDICTOR_SETTING = Setting("predictor", "a folder written by `dyrate-eval train-predictor`", _parse_predictor, _default_predictor)


class DyRate(PruningPolicy):
    """A learned predictor picks the pruning rate anew at every generation step, from the
    step's attention per head on the system, image, instruction and response tokens at
    layer K-1 (K and the rates come with the predictor); layers >= K keep the top
    (1 - rate) share of image tokens by that step's attention, among those still kept
    (progressive: evicted tokens leave the KV cache for good) or, with mode=mask, among
    all of them."""

    name = "dyrate"
    settings = (PREDICTOR_SETTING, MODE_SETTING, POSITIONS_SETTING)

    def __init__(self, arch, values):
        super().__init__(arch, values)
        self.K = self.predictor.K
        self.decision_flops = self.predictor.flops
        # it only infers here: the standardisation folded into its layer, on the device
        # of the observations (moved there once, not at every step)
        with torch.no_grad():
            self._weight, self._bias = self.predictor.folded()
        # the keep count of each rate for the image counts of the generation running
        # (the executor hands the same counts to every step of one generation)
        self._counts_for: torch.Tensor | None = None
        self._keep_counts: torch.Tensor | None = None

    @property
    def progressive(self) -> bool:
        return self.mode == "progressive"

    def describe(self):
        return {"method": self.name, "predictor": self.predictor.source, "mode": self.mode, "K": self.K,
                "rates": list(self.predictor.rates), "positions": self.positions}

    def observes(self, layer, step):
        return layer == self.K

    def keep_before_layer(self, layer, step, view):
        if layer != self.K:
            return None
        features = view.group_attention.flatten(1)  # float32, as the executor's attention rows are
        if self._weight.device != features.device:
            self._weight, self._bias = self._weight.to(features.device), self._bias.to(features.device)
        if view.n_img is not self._counts_for:
            self._counts_for = view.n_img
            self._keep_counts = self.predictor.keep_counts(view.n_img).to(features.device)
        rate = torch.addmm(self._bias, features, self._weight).argmax(-1, keepdim=True)
        return self._keep_counts.gather(1, rate)[:, 0]
