"""Public entry points: put a method on a loaded LLaVA model and read what it executed."""

from __future__ import annotations

from typing import Any

import torch

from . import hf_llava
from .errors import PruningConfigError
from .methods import PruningPolicy, make_policy
from .plan import ExecutedPlan


def apply_pruning(model, *, method: str, **settings: Any):
    """Make ``model`` (a ``LlavaForConditionalGeneration``) run ``method`` on every
    forward and ``generate``; in place, returns the model.

    Settings are validated against the model before anything changes, e.g.
    ``apply_pruning(model, method="fastv", K=2, R=0.5)``. Calling it again replaces
    the method.
    """
    policy = make_policy(method, hf_llava.model_arch(model), **settings)
    return hf_llava.install(model, policy)


def remove_pruning(model):
    """Give the model back its own, unpruned forward."""
    return hf_llava.uninstall(model)


def pruning_method(model) -> PruningPolicy | None:
    return hf_llava.installed_policy(model)


def executed_plan(model) -> ExecutedPlan | None:
    """The plan of the model's most recent prefill and the decode steps after it."""
    return hf_llava.last_plan(model)


DTYPES = ("float32", "float16", "bfloat16")


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` is float16 on a GPU and float32 on a CPU; else one of ``DTYPES``."""
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise PruningConfigError(f"dtype={dtype!r} is not allowed: dtype must be one of auto, {', '.join(DTYPES)}")
    return getattr(torch, dtype)
