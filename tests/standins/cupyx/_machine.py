"""The shared fake CUDA machine (tests/standins/_standin_cuda.py), one per process whether this
package was imported as ``cupyx`` or as ``tests.standins.cupyx``."""

import importlib

try:
    import _standin_cuda as machine
except ImportError:  # reached as tests.standins.cupyx, with tests/standins not on sys.path
    machine = importlib.import_module(__name__.split(".cupyx.")[0] + "._standin_cuda")

__all__ = ["machine"]
