"""pycuda stand-in: ``pycuda.driver`` on the fake CUDA machine (see driver.py). There is no
``pycuda.autoinit``: code that relies on it fails here, as spade-edge's must not."""

STANDIN = True
VERSION = (2026, 1)
VERSION_STATUS = ""
VERSION_TEXT = "2026.1"
