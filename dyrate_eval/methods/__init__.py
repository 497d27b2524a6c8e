"""The registered methods: one file per method in this package, each a small policy
on the pruning core (``dyrate_eval/core/policy.py``). To add one, see
docs/adding-a-method.md; tests/test_method_matrix.py runs every registered method
through the core's invariants.
"""

from __future__ import annotations

from typing import Any

from ..arch import Arch
from ..core.policy import PruningPolicy
from ..errors import PruningConfigError
from .dart import DART
from .depth_prune import DepthPrune
from .dyrate import DyRate
from .fastv import FastV
from .fixed_prune import FixedPrune
from .knorm import KeyNorm
from .original import Original
from .pdrop import PyramidDrop
from .prumerge import PruMerge
from .schedule import SCHEDULE_SEARCHES, Schedule
from .sparsevlm import SparseVLM
from .visionzip import VisionZip
from .vtw import VTW

METHODS: dict[str, type[PruningPolicy]] = {
    policy.name: policy
    for policy in (Original, FastV, VTW, DyRate, FixedPrune, DepthPrune, Schedule, KeyNorm, PyramidDrop, DART, VisionZip,
                   PruMerge, SparseVLM)
}
# The order methods are listed in: every registered method, then the searches whose
# schedules run as method 'schedule' but are reported under their own names
METHOD_ORDER = (*METHODS, *SCHEDULE_SEARCHES)


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


def make_policy(method: str, arch: Arch, **raw_settings: Any) -> PruningPolicy:
    """Validate a method and its settings against a model's shape and build its policy.

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
            values[name] = setting.default(arch)
            continue
        raw = raw_settings[name]
        try:
            values[name] = setting.parse(raw, arch)
        except PruningConfigError:
            raise
        except (ValueError, TypeError):
            depth_note = f" (this model has {arch.layers} decoder layers)" if "num_layers" in setting.allowed else ""
            allowed = setting.allowed.replace("num_layers-1", str(arch.layers - 1))
            raise PruningConfigError(
                f"{name}={raw!r} is not allowed for method {method!r}: {name} must be {allowed}{depth_note}"
            ) from None
    return policy_class(arch, values)
