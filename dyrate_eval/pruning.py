"""Public entry points: put a method on a loaded LLaVA model and read what it executed."""

from __future__ import annotations

from typing import Any

from .core import hf_llava
from .core.plan import ExecutedPlan
from .core.policy import PruningPolicy
from .methods import make_policy


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
