"""`utils.native.native_output_to_log`: native writes to fd 1/2 stay off the console."""

import os

import pytest

from keras_dmr.utils.native import native_output_to_log


def test_native_writes_go_to_the_log_and_the_log_goes_on_success(capfd):
    with native_output_to_log("probe") as log:
        os.write(2, b"fully_quantize: 0, inference_type: 6\n")
        os.write(1, b"native stdout\n")
        assert b"fully_quantize" in log.read_bytes()
    captured = capfd.readouterr()
    assert "fully_quantize" not in captured.err and "native stdout" not in captured.out
    assert not log.exists()
    os.write(2, b"after\n")  # the descriptors are restored
    assert "after" in capfd.readouterr().err


def test_the_log_is_kept_when_the_block_fails(capfd):
    with pytest.raises(RuntimeError):
        with native_output_to_log("probe") as log:
            os.write(2, b"the converter's reason\n")
            raise RuntimeError("failed")
    assert log.read_bytes() == b"the converter's reason\n"
    assert "reason" not in capfd.readouterr().err
    log.unlink()
