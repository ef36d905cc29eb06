"""The shared fake CUDA machine (tests/standins/_standin_cuda.py), one per process whether this
package was imported as ``pycuda`` or as ``tests.standins.pycuda``."""

import importlib

try:
    import _standin_cuda as machine
except ImportError:  # reached as tests.standins.pycuda, with tests/standins not on sys.path
    machine = importlib.import_module(__name__.split(".pycuda.")[0] + "._standin_cuda")

__all__ = ["machine"]
