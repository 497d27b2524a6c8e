"""What the lmms-eval models (``model_wrappers/``) and the library share: the names the
models are registered under with lmms-eval and the method each runs, and the dtype
rule for loading a checkpoint, and the lookups of lmms-eval's models and tasks. The
library reaches the models only through lmms-eval's registry (``lmms_model_class``),
never by importing ``model_wrappers``."""

from __future__ import annotations

import functools

import torch

from .errors import PruningConfigError

# The lmms-eval models and the method each runs: None means chosen with method=,
# defaulting to DEFAULT_METHOD. The wrappers and the results reader both use this.
DEFAULT_METHOD = "dyrate"
LMMS_MODELS: dict[str, str | None] = {
    "dyrate_llava": None,
    "original_llava": "original",
    "fastv_llava": "fastv",
    "vtw_llava": "vtw",
}

DTYPES = ("float32", "float16", "bfloat16")


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` is float16 on a GPU and float32 on a CPU; else one of ``DTYPES``."""
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise PruningConfigError(f"dtype={dtype!r} is not allowed: dtype must be one of auto, {', '.join(DTYPES)}")
    return getattr(torch, dtype)


def lmms_model_class(name: str) -> type:
    """The lmms-eval model class registered as ``name`` (one of ``LMMS_MODELS``), looked
    up in lmms-eval's registry as its CLI does."""
    from lmms_eval.models import get_model

    return get_model(name, force_simple=True)


@functools.cache
def _task_index(include_path: str, include_defaults: bool):
    from lmms_eval.tasks import TaskManager

    return TaskManager("WARNING", include_path=include_path, include_defaults=include_defaults)


def task_manager(task: str, include_path: str):
    """lmms-eval's task index holding ``task``: the local tasks alone when they hold it
    (indexing lmms-eval's own few hundred tasks takes about 20 s), else lmms-eval's too.
    Each index is built once per process."""
    local = _task_index(include_path, False)
    if task in local.all_tasks:
        return local
    everything = _task_index(include_path, True)
    if task not in everything.all_tasks:
        raise PruningConfigError(f"task {task!r} is not an lmms-eval task (looked in lmms-eval's tasks and {include_path})")
    return everything
