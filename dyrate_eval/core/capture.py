"""Keeping what a module returns while it runs (a forward hook for the length of a block)."""


class OutputCapture:
    """Keeps what ``module`` returns while the context is open (nothing for None)."""

    def __init__(self, module):
        self.module = module
        self.output = None

    def __enter__(self):
        if self.module is not None:
            self._handle = self.module.register_forward_hook(self._keep)
        return self

    def _keep(self, module, args, output):
        self.output = output

    def __exit__(self, *exc):
        if self.module is not None:
            self._handle.remove()
