"""No pruning: the reference every ratio is taken against."""

from ..core.policy import PruningPolicy


class Original(PruningPolicy):
    """The unmodified model, run through the core (its plan and FLOPs recorded alike)."""

    name = "original"
    needs_image = False  # it selects nothing: a text-only prompt runs as the unmodified model runs it
