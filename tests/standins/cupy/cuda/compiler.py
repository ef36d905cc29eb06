"""``cupy.cuda.compiler`` stand-in: the exception a kernel source that does not compile raises."""

STANDIN = True


class CompileException(Exception):
    """Raised with g++'s messages where CuPy would raise it with NVRTC's."""
