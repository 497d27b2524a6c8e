"""dyrate-eval: visual-token reduction for LLaVA-1.5 on the lmms-eval harness."""

from .errors import PruningConfigError
from .methods import METHODS
from .plan import ExecutedPlan
from .pruning import apply_pruning, executed_plan, pruning_method, remove_pruning

__all__ = [
    "METHODS",
    "ExecutedPlan",
    "PruningConfigError",
    "apply_pruning",
    "executed_plan",
    "pruning_method",
    "remove_pruning",
]
