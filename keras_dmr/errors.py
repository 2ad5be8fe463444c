"""The package's exceptions, in one place (no heavy imports here)."""


class UsageError(Exception):
    """A bad argument: ``keras-dmr`` prints ``keras-dmr: error: <message>`` and returns 2."""

    def __init__(self, message: str, usage: str | None = None):
        super().__init__(message)
        self.usage = usage


class ConversionError(ValueError):
    """A model (or one of its layers) cannot be rewritten as a plain network."""


class ExportError(ValueError):
    """A model or a destination the exporter cannot use."""


class CorruptArchiveError(ValueError):
    """A ``.keras`` file that is not a complete, intact zip archive."""
