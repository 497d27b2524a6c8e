"""The one exception type users see for bad settings and bad input."""


class PruningConfigError(ValueError):
    """A setting or an input that the pruning core cannot run with.

    Raised before any model work; the message names the setting and what is allowed.
    """
