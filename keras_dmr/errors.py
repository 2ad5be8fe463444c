"""Errors shared by the command line and the modules it drives (no heavy imports here)."""


class UsageError(Exception):
    """A bad argument: ``keras-dmr`` prints ``keras-dmr: error: <message>`` and returns 2."""

    def __init__(self, message: str, usage: str | None = None):
        super().__init__(message)
        self.usage = usage
