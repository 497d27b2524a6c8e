"""dyrate-eval: visual-token reduction for LLaVA-1.5 on the lmms-eval harness."""

from .core.plan import ExecutedPlan
from .embedded import EMBEDDED_MODEL_DIR
from .errors import PruningConfigError
from .methods import METHODS
from .pruning import apply_pruning, executed_plan, pruning_method, remove_pruning

__all__ = [
    "EMBEDDED_MODEL_DIR",
    "METHODS",
    "ExecutedPlan",
    "PruningConfigError",
    "apply_pruning",
    "executed_plan",
    "pruning_method",
    "remove_pruning",
]
