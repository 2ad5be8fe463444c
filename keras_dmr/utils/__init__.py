"""Helpers every layer of the package may use (``keras_dmr.utils``): atomic writes
(:mod:`~keras_dmr.utils.files`), argparse types and destination checks
(:mod:`~keras_dmr.utils.arguments`), ``.keras`` archive integrity
(:mod:`~keras_dmr.utils.archives`) and interleaved timing (:mod:`~keras_dmr.utils.timing`).
Nothing here imports another part of keras_dmr but :mod:`keras_dmr.errors`."""
