"""``cupy.RawModule`` / ``cupy.RawKernel`` stand-ins: the CUDA source compiled as C++ for the CPU
(tests/standins/_standin_kernels.py), each launch running every thread of the grid.

Faithful: ``RawModule(code=..., options=...)``, ``get_function(name)`` (a kernel without
``extern "C"`` is not found by its plain name: CUDADriverError CUDA_ERROR_NOT_FOUND), the call
``kernel(grid, block, args, shared_mem=0, stream=None)``; arguments as CuPy passes them: device
arrays for pointers (a numpy array raises CuPy's TypeError), numpy scalars passed at their own
width, Python ints as 8-byte ``long long``, floats as ``double``; the launch goes to ``stream``
(default: the current one) and runs when that stream is synchronized, or at once on the null
stream; block and grid limits (1024 threads a block) raise CUDADriverError.

Stricter than CuPy, which passes whatever it is given and lets the kernel misread it: a scalar
whose type is not the parameter's C type, an array whose dtype is not the pointee's, a wrong
number of arguments raise TypeError; a device array of another device than the current one raises
CUDARuntimeError (cudaErrorIllegalAddress: the kernel would fault).

NVRTC's include search, as NVRTC has it: an ``#include <...>`` that the preprocessor keeps (with
``__CUDACC__``, ``__CUDACC_RTC__`` and the options' macros defined) must name one of NVRTC's built-in
headers or a file in a folder given with ``-I``; otherwise CompileException with NVRTC's message
("could not open source file"). NVRTC, unlike nvcc, has no default CUDA include folder.

Not modelled: ``shared_mem`` (dynamic shared memory: such a kernel needs its own launcher, see
``_standin_kernels.register_launcher``; static ``__shared__`` arrays and ``__syncthreads`` run in
the shim), cooperative launches, ``path=`` (cubin/PTX files).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ._machine import kernels, machine
from ._ndarray import ndarray
from .cuda import stream as _stream
from .cuda.compiler import CompileException
from .cuda.driver import CUDADriverError
from .cuda.driver import errors as driver_errors
from .cuda.runtime import CUDARuntimeError, current_context

MAX_THREADS = 1024
MAX_BLOCK = (1024, 1024, 64)
MAX_GRID = (2**31 - 1, 65535, 65535)


# headers NVRTC 12/13 carry inside itself (no -I needed)
NVRTC_BUILTIN = frozenset(
    {"cuda_fp16.h", "cuda_fp16.hpp", "cuda_bf16.h", "cuda_bf16.hpp", "cuda_fp8.h", "cuda_fp8.hpp"}
)


def _include_folders(options: tuple[str, ...]) -> list[Path]:
    out, it = [], iter(options)
    for opt in it:
        if opt in ("-I", "--include-path"):
            out.append(Path(next(it, "")))
        elif opt.startswith("--include-path="):
            out.append(Path(opt.split("=", 1)[1]))
        elif opt.startswith("-I"):
            out.append(Path(opt[2:]))
    return out


def _check_includes(code: str, options: tuple[str, ...]) -> None:
    """The system includes NVRTC would open (those the conditionals keep, with NVRTC's macros and the
    options' defined) must be built in or found under an -I folder."""
    if not kernels.INCLUDE_LINE.search(code):
        return
    try:
        kept = kernels.conditionals(code, kernels._gxx_flags(options), cuda=True)
    except kernels.CompileError as exc:
        raise CompileException(str(exc)) from None
    folders = _include_folders(options)
    for name in re.findall(kernels.INCLUDE_MARK + r" <([^>]+)>", kept):
        if name in NVRTC_BUILTIN or any((f / name).is_file() for f in folders):
            continue
        where = "no directories in search list" if not folders else "searched " + ", ".join(map(str, folders))
        raise CompileException(
            f'kern.cu: catastrophic error: could not open source file "{name}" ({where})\n'
            '1 catastrophic error detected in the compilation of "kern.cu".'
        )


def _compile(code: str, options: tuple[str, ...]):
    _check_includes(code, options)
    try:
        return kernels.compile_source(code, options)
    except kernels.CompileError as exc:
        raise CompileException(str(exc)) from None


def _dims(value, what: str) -> tuple[int, int, int]:
    dims = (value,) if isinstance(value, (int, np.integer)) else tuple(value)
    if not 1 <= len(dims) <= 3 or not all(isinstance(d, (int, np.integer)) for d in dims):
        raise TypeError(f"{what} must be an int or a tuple of 1 to 3 ints, got {value!r}")
    return tuple(int(d) for d in dims) + (1,) * (3 - len(dims))


class RawModule:
    def __init__(
        self,
        code: str | None = None,
        *,
        path=None,
        options=(),
        backend="nvrtc",
        translate_cucomplex=False,
        enable_cooperative_groups=False,
        name_expressions=None,
        jitify=False,
    ):
        if (code is None) == (path is None):
            raise TypeError("Exactly one of code and path keyword arguments must be given.")
        if path is not None:
            raise NotImplementedError("the CuPy stand-in compiles CUDA sources (code=...), not cubin/PTX files")
        self.code, self.options, self.backend = code, tuple(options), backend
        self._library = None

    def _lib(self):
        if self._library is None:
            self._library = _compile(self.code, self.options)
        return self._library

    def get_function(self, name: str) -> Function:
        lib = self._lib()
        if name not in lib.kernels:
            raise CUDADriverError(
                machine.NOT_FOUND,
                f'no extern "C" __global__ function {name!r} in the module (it has {sorted(lib.kernels)})',
            )
        return Function(lib, name)


class RawKernel:
    """``cupy.RawKernel(code, name, options=())``: one kernel of a source, compiled on first call."""

    def __init__(
        self,
        code: str,
        name: str,
        options=(),
        backend="nvrtc",
        translate_cucomplex=False,
        *,
        enable_cooperative_groups=False,
        jitify=False,
    ):
        self.code, self.name, self.options = code, name, tuple(options)
        self._module = RawModule(code=code, options=options)

    def __call__(self, grid, block, args, *, shared_mem=0, stream=None, enable_cooperative_groups=False):
        return self._module.get_function(self.name)(grid, block, args, shared_mem=shared_mem, stream=stream)


class Function:
    """A kernel of a compiled module, launched as CuPy launches it."""

    def __init__(self, lib, name: str):
        self._lib, self.name = lib, name
        self.params = lib.kernels[name]

    def __call__(self, grid, block, args, *, shared_mem=0, stream=None, enable_cooperative_groups=False):
        grid3, block3 = _dims(grid, "grid"), _dims(block, "block")
        if np.prod(block3) > MAX_THREADS or any(b > m for b, m in zip(block3, MAX_BLOCK)) or min(block3) < 1:
            raise CUDADriverError(machine.INVALID_VALUE, f"block {block3}: at most {MAX_THREADS} threads, {MAX_BLOCK}")
        if any(g > m for g, m in zip(grid3, MAX_GRID)) or min(grid3) < 1:
            raise CUDADriverError(machine.INVALID_VALUE, f"grid {grid3}: at least 1 and at most {MAX_GRID}")
        if shared_mem and not kernels.has_custom_launcher(self.name):
            raise NotImplementedError(
                f"kernel {self.name}: dynamic shared memory needs its own CPU launcher "
                "(_standin_kernels.register_launcher)"
            )
        ctx = current_context()
        with driver_errors():
            s = machine.stream_for((stream or _stream.get_current_stream()).ptr, ctx, f"kernel {self.name}")
        c_args = self._c_args(tuple(args), ctx)

        def work(keep_alive=tuple(args)):  # the arrays live until the queued launch has run
            self._lib.launch(self.name, grid3, block3, shared_mem, c_args)

        machine.count("kernels")
        with driver_errors():
            machine.submit(s, ctx, work, f"kernel {self.name}")

    def _c_args(self, args: tuple, ctx) -> list:
        if len(args) != len(self.params):
            raise TypeError(
                f"kernel {self.name} takes {len(self.params)} arguments, got {len(args)} "
                "[stand-in: CuPy would launch it with garbage]"
            )
        out = []
        for i, (a, p) in enumerate(zip(args, self.params)):
            where = f"kernel {self.name} argument {i} ({p.text})"
            if p.pointer:
                if not isinstance(a, ndarray):
                    raise TypeError(f"Unsupported type {type(a)}\n[stand-in] {where}")
                if a.dtype != p.dtype:
                    raise TypeError(
                        f"{where} given a {a.dtype} array [stand-in: the kernel would read it as {p.dtype}]"
                    )
                if a._context is not ctx:
                    raise CUDARuntimeError(
                        machine.ILLEGAL_ADDRESS,
                        f"{where}: array of device {a._context.device}, launched on device {ctx.device}",
                    )
                out.append(a.data.ptr)
                continue
            # what CuPy passes for Python scalars: int as long long, float as double, bool as bool
            v = (
                np.bool_(a)
                if isinstance(a, bool)
                else np.int64(a)
                if isinstance(a, int)
                else (np.float64(a) if isinstance(a, float) else a)
            )
            if not isinstance(v, np.generic):
                raise TypeError(f"Unsupported type {type(a)}\n[stand-in] {where}")
            if v.dtype != p.dtype:
                raise TypeError(
                    f"{where} given {type(a).__name__} {a!r}, which CuPy passes as {v.dtype.itemsize} bytes "
                    f"of {v.dtype} [stand-in: the kernel would read it as {p.dtype}]"
                )
            out.append(v.item())
        return out
