"""Method settings: how each is parsed and checked against the model's shape, and the
settings several methods share (K, R, selection, mode, positions)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from ..arch import Arch


@dataclass(frozen=True)
class Setting:
    """One user-facing setting of a method: its parse/check rule and its default."""

    name: str
    allowed: str  # human-readable allowed values, used in error messages
    parse: Callable[[Any, Arch], Any]  # (raw value, model shape) -> value; raises ValueError if not allowed
    default: Callable[[Arch], Any]  # model shape -> default value


def parse_layer(value: Any, arch: Arch) -> int:
    """A decoder layer that may drop before it: 1..layers-1 (layer 0 sees every token)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError
    number = float(value)
    if not number.is_integer() or not 1 <= number <= arch.layers - 1:
        raise ValueError
    return int(number)


def _parse_rate(value: Any, arch: Arch) -> float:
    if isinstance(value, bool):
        raise ValueError
    number = float(value)
    if not (0.0 <= number <= 1.0) or math.isnan(number):
        raise ValueError
    return number


def layer_setting(default: Callable[[Arch], int]) -> Setting:
    return Setting("K", "an integer in 1..num_layers-1", parse_layer, default)


def rate_setting(default: float) -> Setting:
    return Setting("R", "a number in [0, 1]", _parse_rate, lambda arch: default)


RATE_SETTING = rate_setting(0.5)


def choice_setting(name: str, choices: tuple[str, ...], default: str) -> Setting:
    """A setting that takes one of ``choices``."""

    def parse(value: Any, arch: Arch) -> str:
        if value not in choices:
            raise ValueError
        return value

    return Setting(name, " or ".join(choices), parse, lambda arch: default)


SELECTIONS = ("attention", "random")
# Random selection of the same count is the control that tells whether the attention
# ranking carries information on a model.
SELECTION_SETTING = choice_setting("selection", SELECTIONS, "attention")

MODES = ("progressive", "mask")
MODE_SETTING = choice_setting("mode", MODES, "progressive")

POSITIONS = ("original", "renumber")


def positions_setting(default: str) -> Setting:
    """The position ids of the tokens after a drop: every method that drops inside the
    decoder takes it (``PruningPolicy.positions``)."""
    return choice_setting("positions", POSITIONS, default)


# Surviving tokens keep their prompt positions: FastV's and VTW's convention
POSITIONS_SETTING = positions_setting("original")
