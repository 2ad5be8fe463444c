"""The main job (``keras-dmr demo``, the README's ``make demo``) end to end, at 1 epoch."""

from __future__ import annotations

import pytest

from keras_dmr import cli


@pytest.mark.slow
def test_demo_trains_converts_exports_and_reruns(tmp_path, capsys):
    argv = ["demo", "--epochs", "1", "--runs", str(tmp_path / "runs")]
    argv += ["--base-dir", str(tmp_path / "savedmodels")]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    for expected in ("== summary", "plain (ONNX Runtime)", "max relative error", "images/s"):
        assert expected in out
    assert (tmp_path / "savedmodels" / "resnet20_digits" / "1" / "saved_model.pb").is_file()
    assert (tmp_path / "savedmodels" / "resnet20_digits_v1.onnx").is_file()
    # A second run reuses the trained checkpoints and exports a new version.
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "already trained for 1 epochs" in out
    assert (tmp_path / "savedmodels" / "resnet20_digits" / "2" / "saved_model.pb").is_file()
    assert (tmp_path / "savedmodels" / "resnet20_digits_v2.onnx").is_file()
