"""The shared fake CUDA machine (tests/standins/_standin_cuda.py), one per process whether this
package was imported as ``tensorrt`` or as ``tests.standins.tensorrt``."""

import importlib

try:
    import _standin_cuda as machine
except ImportError:  # reached as tests.standins.tensorrt, with tests/standins not on sys.path
    machine = importlib.import_module(__name__.split(".tensorrt.")[0] + "._standin_cuda")

__all__ = ["machine"]
