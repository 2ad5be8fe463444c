"""The package version, in one place (``keras_dmr.__version__``)."""

__version__ = "0.1.0"
