"""dyrate-eval: visual-token reduction for LLaVA-1.5 on the lmms-eval harness."""

from pathlib import Path

from .errors import PruningConfigError
from .methods import METHODS
from .plan import ExecutedPlan
from .pruning import apply_pruning, executed_plan, pruning_method, remove_pruning

# The embedded default: a small LLaVA-1.5-architecture model trained on the shapes world
# by ``dyrate-eval train-embedded``, shipped in the package (fp16 safetensors).
EMBEDDED_MODEL_DIR = Path(__file__).parent / "embedded_llava"

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
