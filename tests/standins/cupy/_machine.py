"""The shared fake CUDA machine and kernel compiler (tests/standins/_standin_*.py), one per
process whether this package was imported as ``cupy`` or as ``tests.standins.cupy``."""

import importlib

try:
    import _standin_cuda as machine
    import _standin_kernels as kernels
except ImportError:  # reached as tests.standins.cupy, with tests/standins not on sys.path
    _parent = __name__.split(".cupy.")[0]
    machine = importlib.import_module(_parent + "._standin_cuda")
    kernels = importlib.import_module(_parent + "._standin_kernels")

__all__ = ["kernels", "machine"]
