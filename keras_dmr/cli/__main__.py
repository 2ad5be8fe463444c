"""``python -m keras_dmr.cli``: the ``keras-dmr`` command (without the console script's quieting
of TensorFlow's start-up logging)."""

import sys

from keras_dmr.cli import main

sys.exit(main())
