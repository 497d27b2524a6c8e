"""Pruning methods as small policies on the shared core.

A policy answers one question for the executor in ``hf_llava``: before decoder layer
``layer`` at generation step ``step``, how many image tokens should each sample keep?
``None`` means "no change". The executor does the rest (ranking by attention score,
physically removing tokens, recording the plan), so a policy holds no tensors of the
model and touches no transformers code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch

from .errors import PruningConfigError


@dataclass(frozen=True)
class Setting:
    """One user-facing setting of a method: its parse/check rule and its default."""

    name: str
    allowed: str  # human-readable allowed values, used in error messages
    parse: Callable[[Any, int], Any]  # (raw value, num_layers) -> value; raises ValueError if not allowed
    default: Callable[[int], Any]  # num_layers -> default value


def _parse_layer(value: Any, num_layers: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError
    number = float(value)
    if not number.is_integer() or not 1 <= number <= num_layers - 1:
        raise ValueError
    return int(number)


def _parse_rate(value: Any, num_layers: int) -> float:
    if isinstance(value, bool):
        raise ValueError
    number = float(value)
    if not (0.0 <= number <= 1.0) or math.isnan(number):
        raise ValueError
    return number


def layer_setting(default: Callable[[int], int]) -> Setting:
    return Setting("K", "an integer in 1..num_layers-1", _parse_layer, default)


RATE_SETTING = Setting("R", "a number in [0, 1]", _parse_rate, lambda num_layers: 0.5)
SELECTIONS = ("attention", "random")


def _parse_selection(value: Any, num_layers: int) -> str:
    if value not in SELECTIONS:
        raise ValueError
    return value


# Random selection of the same count is the control that tells whether the attention
# ranking carries information on a model.
SELECTION_SETTING = Setting("selection", " or ".join(SELECTIONS), _parse_selection, lambda num_layers: "attention")


@dataclass
class StepView:
    """What a policy may look at when deciding: per-sample image counts at this point."""

    n_img: torch.Tensor  # (B,) image tokens in each sample's prompt
    kept: torch.Tensor  # (B,) image tokens each sample still sees before this layer


class PruningPolicy:
    """Base of every method. Subclasses set ``name`` and ``settings`` and override
    ``keep_before_layer``."""

    name: ClassVar[str]
    settings: ClassVar[tuple[Setting, ...]] = ()

    def __init__(self, num_layers: int, values: dict[str, Any]):
        self.num_layers = num_layers
        for setting in self.settings:
            setattr(self, setting.name, values[setting.name])

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, **{s.name: getattr(self, s.name) for s in self.settings}}

    def keep_before_layer(self, layer: int, step: int, view: StepView) -> torch.Tensor | None:
        """Image tokens to keep per sample from ``layer`` on, or None to keep the current set."""
        return None

    @property
    def ranks_by_attention(self) -> bool:
        """Whether the executor ranks image tokens by the attention it measures; when
        not, ``selection_scores`` ranks them."""
        return True

    def selection_scores(self, candidates: torch.Tensor) -> torch.Tensor:
        """Scores ranking the (B, N) ``candidates`` for keeping (higher is kept first)."""
        raise NotImplementedError(f"{self.name} ranks image tokens by attention")


class Original(PruningPolicy):
    """No pruning: the reference every ratio is taken against."""

    name = "original"


class FastV(PruningPolicy):
    """At prefill, after layer K-1, keep the top (1-R) share of image tokens for all
    layers >= K and for the whole generation. ``selection=random`` keeps a random set
    of the same size instead (a control for the attention ranking)."""

    name = "fastv"
    settings = (layer_setting(lambda num_layers: 2), RATE_SETTING, SELECTION_SETTING)

    def __init__(self, num_layers, values):
        super().__init__(num_layers, values)
        # seeded once per model: a rerun of the same requests drops the same tokens
        self._random = torch.Generator().manual_seed(0)

    def keep_before_layer(self, layer, step, view):
        if step == 0 and layer == self.K:
            return torch.round((1.0 - self.R) * view.n_img.double()).long()
        return None

    @property
    def ranks_by_attention(self):
        return self.selection == "attention"

    def selection_scores(self, candidates):
        return torch.rand(candidates.shape, generator=self._random).to(candidates.device)


class VTW(PruningPolicy):
    """Visual-token withdrawal: layers >= K see no image tokens, in prefill and decode.

    The default K is half the depth: 16 of 32 layers (7B) and 20 of 40 (13B), VTW's
    published choices for LLaVA-1.5.
    """

    name = "vtw"
    settings = (layer_setting(lambda num_layers: num_layers // 2),)

    def keep_before_layer(self, layer, step, view):
        if step == 0 and layer == self.K:
            return torch.zeros_like(view.n_img)
        return None


METHODS: dict[str, type[PruningPolicy]] = {policy.name: policy for policy in (Original, FastV, VTW)}

# The lmms-eval models and the method each runs: None means chosen with method=,
# defaulting to DEFAULT_METHOD. The wrappers and the results reader both use this.
DEFAULT_METHOD = "original"
LMMS_MODELS: dict[str, str | None] = {
    "dyrate_llava": None,
    "original_llava": "original",
    "fastv_llava": "fastv",
    "vtw_llava": "vtw",
}


def parse_settings(pairs: list[str], *, label: str = "setting {pair!r}", example: str = "K=2") -> dict[str, str]:
    """``["K=2", "R=0.5"]`` -> ``{"K": "2", "R": "0.5"}``; a pair without ``=`` is
    refused with a message built from ``label`` and ``example``."""
    settings = {}
    for pair in pairs:
        if "=" not in pair:
            raise PruningConfigError(f"{label.format(pair=pair)} must look like NAME=VALUE, e.g. {example}")
        key, value = pair.split("=", 1)
        settings[key] = value
    return settings


def make_policy(method: str, num_layers: int, **raw_settings: Any) -> PruningPolicy:
    """Validate a method and its settings against a model depth and build its policy.

    Every problem raises ``PruningConfigError`` naming the setting and the allowed values.
    """
    if method not in METHODS:
        raise PruningConfigError(
            f"unknown method {method!r}: allowed methods are {', '.join(METHODS)}"
        )
    policy_class = METHODS[method]
    known = {s.name: s for s in policy_class.settings}
    unknown = [name for name in raw_settings if name not in known]
    if unknown:
        takes = ", ".join(known) if known else "no settings"
        raise PruningConfigError(
            f"method {method!r} does not take setting {unknown[0]!r}; it takes: {takes}"
        )
    values = {}
    for name, setting in known.items():
        if name not in raw_settings or raw_settings[name] is None:
            values[name] = setting.default(num_layers)
            continue
        raw = raw_settings[name]
        try:
            values[name] = setting.parse(raw, num_layers)
        except (ValueError, TypeError):
            depth_note = f" (this model has {num_layers} decoder layers)" if "num_layers" in setting.allowed else ""
            allowed = setting.allowed.replace("num_layers-1", str(num_layers - 1))
            raise PruningConfigError(
                f"{name}={raw!r} is not allowed for method {method!r}: {name} must be {allowed}{depth_note}"
            ) from None
    return policy_class(num_layers, values)
