"""Export one saved ``.keras`` model in a process of its own (the benchmark's exports).

``python -m keras_dmr.bench.export_worker {onnx|saved_model} MODEL.keras OUT`` writes OUT (an
``.onnx`` file, or a TF Serving directory whose version path it prints) with
``preprocessing="none"`` and the model's form kept (``plain=False``). A process of its own returns
tf2onnx's memory to the system when it ends (it peaks at about 250 bytes per parameter) and keeps
a crash from ending the benchmark.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main(argv: list[str] | None = None) -> int:
    engine, model_path, out = argv if argv is not None else sys.argv[1:]
    import keras

    import keras_dmr.models  # noqa: F401  (registers the package's layers and models for loading)
    from keras_dmr import export

    model = keras.saving.load_model(model_path, compile=False, safe_mode=True)
    if engine == "onnx":
        path = export.onnx(model, out, preprocessing="none", plain=False, overwrite=True)
    elif engine == "saved_model":
        path = export.saved_model(model, out, preprocessing="none", plain=False)
    else:
        raise SystemExit(f"unknown engine {engine!r}: onnx or saved_model")
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
