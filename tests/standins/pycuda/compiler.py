"""``pycuda.compiler`` stand-in: ``SourceModule`` compiles CUDA source as C++ for the CPU (the stand-ins'
compiler, tests/standins/_standin_kernels.py) and launches kernels as pycuda does.

Faithful: ``SourceModule(source, options=None, no_extern_c=False, ...)`` wraps the source in
``extern "C" { }`` unless ``no_extern_c``; loading needs a current context (pycuda loads the module
into it) and ``get_function`` raises LogicError "cuModuleGetFunction failed: named symbol not found"
for a name the module lacks; ``func(*args, block=(x, y, z), grid=(x, y), stream=None, shared=0)``
passes each argument as pycuda's ``_build_arg_buf`` does: numpy scalars at their own width,
``DeviceAllocation`` as a pointer, anything else (a Python int or float too) TypeError "invalid type
on parameter #i (0-based)". The launch runs in the calling thread's current context, on ``stream``
(queued until synchronized) or the null stream.

Stricter than pycuda: a scalar whose dtype is not the parameter's C type, a pointer parameter given
anything but an 8-byte integer scalar or a DeviceAllocation, or an address that is not live device
memory of the current context raise (pycuda would launch and the kernel would misread or fault).
"""

from __future__ import annotations

import numpy as np

from . import driver
from ._machine import machine

try:
    import _standin_kernels as _kernels
except ImportError:  # reached as tests.standins.pycuda
    import importlib

    _kernels = importlib.import_module(__name__.split(".pycuda.")[0] + "._standin_kernels")

STANDIN = True


class CompileError(Exception):
    """pycuda.driver.CompileError's place: the compiler's messages."""


class SourceModule:
    def __init__(
        self,
        source: str,
        nvcc: str = "nvcc",
        options=None,
        keep: bool = False,
        no_extern_c: bool = False,
        arch=None,
        code=None,
        cache_dir=None,
        include_dirs=(),
    ):
        with driver._Call("cuModuleLoadDataEx") as call:
            self._context = call.context()
        text = source if no_extern_c else 'extern "C" {\n' + source + "\n}\n"
        try:
            self._lib = _kernels.compile_source(text, tuple(options or ()))
        except _kernels.CompileError as exc:
            raise CompileError(str(exc)) from None

    def get_function(self, name: str) -> Function:
        if name not in self._lib.kernels:
            raise driver.LogicError(
                "cuModuleGetFunction failed: named symbol not found"
                f"\n[stand-in] the module has {sorted(self._lib.kernels)}"
            )
        return Function(self._lib, name, self._context)


class Function:
    def __init__(self, lib, name: str, context):
        self._lib, self.name, self._module_context = lib, name, context
        self.params = lib.kernels[name]

    def __call__(self, *args, block=(1, 1, 1), grid=(1, 1), stream=None, shared=0, texrefs=(), time_kernel=False):
        with driver._Call("cuLaunchKernel") as call:
            ctx = call.context()
            if ctx is not self._module_context:
                raise machine.CudaError(
                    machine.INVALID_HANDLE,
                    f"the module was loaded in {self._module_context}, launched in {ctx}",
                )
            block3 = tuple(int(b) for b in block) + (1,) * (3 - len(block))
            grid3 = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
            if np.prod(block3) > 1024 or min(block3) < 1 or min(grid3) < 1:
                raise machine.CudaError(machine.INVALID_VALUE, f"block {block3} grid {grid3}")
            if shared:
                raise NotImplementedError("the pycuda stand-in runs static __shared__ memory only")
            c_args = self._c_args(args, ctx)
            s = None if stream is None else machine.stream_for(stream.handle, ctx, "cuLaunchKernel")
            machine.count("kernels")

            def work(keep_alive=args):
                self._lib.launch(self.name, grid3, block3, 0, c_args)

            machine.submit(s, ctx, work, f"kernel {self.name}")

    def _c_args(self, args, ctx) -> list:
        if len(args) != len(self.params):
            raise TypeError(f"kernel {self.name} takes {len(self.params)} arguments, got {len(args)}")
        out = []
        for i, (a, p) in enumerate(zip(args, self.params)):
            where = f"kernel {self.name} parameter #{i} ({p.text})"
            if isinstance(a, driver.DeviceAllocation):
                value = int(a)
            elif isinstance(a, np.number):
                value = a
            else:
                raise TypeError(f"invalid type on parameter #{i} (0-based)\n[stand-in] {where}: {type(a).__name__}")
            if p.pointer:
                if not isinstance(a, driver.DeviceAllocation) and (
                    not isinstance(a, np.integer) or a.dtype.itemsize != 8
                ):
                    raise TypeError(f"{where}: a pointer needs np.uintp(address) or a DeviceAllocation, got {a!r}")
                machine.check_device_memory(int(value), 0, ctx, where, foreign=machine.ILLEGAL_ADDRESS)
                out.append(int(value))
                continue
            if value.dtype != p.dtype:
                raise TypeError(f"{where} given {value.dtype} [stand-in: the kernel would read it as {p.dtype}]")
            out.append(value.item())
        return out
