"""Import Keras (and TensorFlow), and convert models, without the lines their C++ cores print.

Those lines ("oneDNN custom operations are on", "Assets written to", "Created TensorFlow Lite
XNNPACK delegate", the converter's settings) are written straight to file descriptor 2 and no
environment variable silences them all; they would bury the one-line messages of this tool.
Anything else printed meanwhile is passed through.
"""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile

_NOISE = ("All log messages before absl::InitializeLog()", "oneDNN custom operations are on",
          "This TensorFlow binary is optimized", "To enable the following instructions",
          "cuda_", "Unable to register cu", "computation placer already registered", "Assets written to",
          "Created TensorFlow Lite XNNPACK delegate", "fully_quantize:", "Estimated count of arithmetic ops",
          "WARNING: All log messages before absl", "has constructor arguments in the object store")


@contextlib.contextmanager
def quiet():
    """Hold back what C++ code writes to file descriptor 2 meanwhile, but for lines that are not noise."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            for line in capture.read().decode(errors="replace").splitlines():
                if line.strip() and not any(noise in line for noise in _NOISE):
                    print(line, file=sys.stderr)


def keras():
    """The ``keras`` module, imported quietly once."""
    if "keras" in sys.modules and "tensorflow" in sys.modules:
        return sys.modules["keras"]
    with quiet():
        import keras as keras_module
        import tensorflow  # noqa: F401
    return keras_module
