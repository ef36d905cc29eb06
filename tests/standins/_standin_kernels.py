"""CUDA kernel sources compiled as C++ for the CPU (DESIGN.md section 4): the stand-ins' NVRTC.

A source is compiled by g++ with the repository's shim (tests/runtime/cuda_shim.h: ``__global__``,
``threadIdx``/``blockIdx``, ``cuda_shim_run``), together with one generated launcher per
``extern "C" __global__`` kernel it defines::

    extern "C" void standin_launch_<name>(unsigned gx, gy, gz, bx, by, bz, unsigned shared_mem,
                                          <the kernel's own parameters>)

which runs the kernel for every thread of the grid: block after block, a block's threads as fibers
that meet at ``__syncthreads`` (static ``__shared__`` arrays are per block; the shim's header says
what it models). The launcher calls the kernel with its real parameter types, so the compiler checks
the signature the Python side reads (:class:`Param`). Dynamic shared memory (``extern __shared__``)
and warp intrinsics are not provided: such a kernel fails to compile rather than run wrongly, or
gets its own launcher: register its C++ source with :func:`register_launcher` under the kernel's name.

Compiled libraries are cached by content in ``$SPADE_STANDIN_KERNEL_CACHE`` (default: a folder in
the temporary directory), built into a temporary name and renamed, so parallel test processes
share them safely.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

STANDIN = True
SHIM = Path(__file__).resolve().parent.parent / "runtime" / "cuda_shim.h"
KERNEL_FILE = "kernel.cu"  # the name launchers include

# C type of a parameter (pointee for pointers) -> the numpy dtype an argument must have
C_TYPES = {
    "float": np.float32,
    "double": np.float64,
    "signed char": np.int8,
    "char": np.int8,
    "unsigned char": np.uint8,
    "short": np.int16,
    "unsigned short": np.uint16,
    "int": np.int32,
    "unsigned int": np.uint32,
    "unsigned": np.uint32,
    "long": np.int64,
    "unsigned long": np.uint64,  # LP64
    "long long": np.int64,
    "long long int": np.int64,
    "unsigned long long": np.uint64,
    "size_t": np.uint64,
    "bool": np.bool_,
}
CTYPES_SCALARS = {
    np.dtype(np.float32): ctypes.c_float,
    np.dtype(np.float64): ctypes.c_double,
    np.dtype(np.int8): ctypes.c_int8,
    np.dtype(np.uint8): ctypes.c_uint8,
    np.dtype(np.int16): ctypes.c_int16,
    np.dtype(np.uint16): ctypes.c_uint16,
    np.dtype(np.int32): ctypes.c_int32,
    np.dtype(np.uint32): ctypes.c_uint32,
    np.dtype(np.int64): ctypes.c_int64,
    np.dtype(np.uint64): ctypes.c_uint64,
    np.dtype(np.bool_): ctypes.c_bool,
}

_KERNEL = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?(\w+)\s*\(([^)]*)\)')


class CompileError(RuntimeError):
    """g++ refused the source (the stand-ins raise their package's own exception with this text)."""


@dataclass(frozen=True)
class Param:
    """One kernel parameter as declared: ``text`` without its name, e.g. ``const float*``."""

    text: str
    pointer: bool
    const: bool
    dtype: np.dtype  # of the pointee for pointers

    @classmethod
    def parse(cls, decl: str) -> Param:
        words = decl.replace("*", " * ").split()
        if len(words) < 2:
            raise CompileError(f"cannot read kernel parameter {decl.strip()!r} (unnamed parameters are not supported)")
        type_words = words[:-1]  # the last word is the name
        base = " ".join(w for w in type_words if w not in ("const", "*", "__restrict__", "volatile"))
        if type_words.count("*") > 1:
            raise CompileError(f"kernel parameter {decl.strip()!r}: pointers to pointers are not supported")
        if base not in C_TYPES:
            raise CompileError(
                f"kernel parameter {decl.strip()!r}: C type {base!r} has no numpy mapping in "
                "tests/standins/_standin_kernels.py (C_TYPES)"
            )
        text = " ".join(type_words).replace(" *", "*")
        return cls(text, "*" in type_words, "const" in type_words, np.dtype(C_TYPES[base]))

    @property
    def ctype(self):
        return ctypes.c_void_p if self.pointer else CTYPES_SCALARS[self.dtype]


INCLUDE_LINE = re.compile(r'^\s*#\s*include\s*([<"])([^>"]+)[>"]', re.MULTILINE)
INCLUDE_MARK = "SPADE_STANDIN_INCLUDE"


def conditionals(source: str, macros: tuple[str, ...] = (), cuda: bool = False) -> str:
    """``source`` through the preprocessor's conditionals only: its includes are not opened but left as
    lines ``SPADE_STANDIN_INCLUDE <name>`` (or ``"name"``), ``macros`` (-D options) defined, and with
    ``cuda`` also ``__CUDACC__`` and ``__CUDACC_RTC__`` (what NVRTC defines). Sources without any
    conditional are returned as they are."""
    if not re.search(r"^\s*#\s*(if|ifdef|ifndef)\b", source, re.MULTILINE):
        return source

    def mark(m: re.Match) -> str:
        close = ">" if m.group(1) == "<" else '"'
        return f"{INCLUDE_MARK} {m.group(1)}{m.group(2)}{close}"

    marked = INCLUDE_LINE.sub(mark, source)
    defs = ["-D__CUDACC__", "-D__CUDACC_RTC__"] if cuda else []
    run = subprocess.run(
        ["g++", "-E", "-P", "-nostdinc", "-x", "c++", *defs, *macros, "-"],
        input=marked,
        capture_output=True,
        text=True,
        check=False,
    )
    if run.returncode != 0:
        raise CompileError(f"g++ could not preprocess the kernel source:\n{run.stderr}")
    return run.stdout


def kernels_in(source: str, macros: tuple[str, ...] = ()) -> dict[str, tuple[Param, ...]]:
    """Every ``extern "C" __global__`` kernel of ``source`` with its parameters (a kernel without
    extern "C" has a mangled name: CuPy's get_function cannot find it by its plain name either), as
    the conditionals leave it with ``macros`` (-D options) defined."""
    clean = conditionals(source, macros)
    clean = re.sub(r"/\*.*?\*/", " ", clean, flags=re.DOTALL)
    clean = re.sub(r"//[^\n]*", " ", clean)
    found = {}
    for name, params in _KERNEL.findall(clean):
        found[name] = tuple(Param.parse(p) for p in params.split(",") if p.strip() and p.strip() != "void")
    return found


# ---------------------------------------------------------------------------- launchers

_custom_launchers: dict[str, str] = {}


def register_launcher(kernel: str, cpp_source: str) -> None:
    """Use ``cpp_source`` as the launcher of ``kernel``: it includes "kernel.cu" and defines
    ``extern "C" void standin_launch_<kernel>(unsigned gx, unsigned gy, unsigned gz, unsigned bx,
    unsigned by, unsigned bz, unsigned shared_mem, <the kernel's parameters>)``."""
    _custom_launchers[kernel] = cpp_source


def has_custom_launcher(kernel: str) -> bool:
    return kernel in _custom_launchers


def _generic_launcher(name: str, params: tuple[Param, ...]) -> str:
    decls = "".join(f", {p.text} a{i}" for i, p in enumerate(params))
    call = ", ".join(f"a{i}" for i in range(len(params)))
    return (
        f'extern "C" void standin_launch_{name}(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, '
        f"unsigned bz, unsigned /*shared_mem*/{decls})\n"
        f"{{\n    cuda_shim_run({{gx, gy, gz}}, {{bx, by, bz}}, [&] {{ {name}({call}); }});\n}}\n"
    )


def _launchers(kernels: dict[str, tuple[Param, ...]]) -> str:
    parts = [f'#include "{KERNEL_FILE}"\n']
    for name, params in kernels.items():
        parts.append(_custom_launchers.get(name) or _generic_launcher(name, params))
    return "\n".join(parts)


# ---------------------------------------------------------------------------- building

_built: dict[str, Library] = {}
_build_lock = threading.Lock()


def _cache_dir() -> Path:
    d = os.environ.get("SPADE_STANDIN_KERNEL_CACHE")
    if d:
        return Path(d)
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    return Path(tempfile.gettempdir()) / f"spade-standin-kernels-{uid}"


def _gxx_flags(options: tuple[str, ...]) -> list[str]:
    """NVRTC options that mean something to g++ too: macros and include folders."""
    out = []
    it = iter(options)
    for opt in it:
        if opt in ("-D", "-I", "--define-macro", "--include-path"):
            value = next(it, "")
            out.append(("-D" if opt in ("-D", "--define-macro") else "-I") + value)
        elif opt.startswith(("-D", "-I")):
            out.append(opt)
        elif opt.startswith(("--define-macro=", "--include-path=")):
            out.append(("-D" if opt.startswith("--define") else "-I") + opt.split("=", 1)[1])
    return out


class Library:
    """The compiled kernels of one source."""

    def __init__(self, path: Path, kernels: dict[str, tuple[Param, ...]]):
        self.kernels = kernels
        self._dll = ctypes.CDLL(str(path))
        self._fns = {}
        for name, params in kernels.items():
            fn = getattr(self._dll, f"standin_launch_{name}")
            fn.argtypes = [ctypes.c_uint] * 7 + [p.ctype for p in params]
            fn.restype = None
            self._fns[name] = fn

    def launch(
        self, name: str, grid: tuple[int, int, int], block: tuple[int, int, int], shared_mem: int, c_args: list
    ) -> None:
        """Run kernel ``name`` for every thread; ``c_args`` already checked against its Params."""
        self._fns[name](*grid, *block, int(shared_mem), *c_args)


def compile_source(source: str, options: tuple[str, ...] = ()) -> Library:
    """Compile ``source`` (every extern "C" kernel in it) with the shim; cached by content."""
    flags = _gxx_flags(tuple(options))
    kernels = kernels_in(source, tuple(f for f in flags if f.startswith("-D")))
    launcher = _launchers(kernels)
    key = hashlib.sha256("\0".join([source, launcher, SHIM.read_text(), *flags]).encode()).hexdigest()[:24]
    with _build_lock:
        if key in _built:
            return _built[key]
        gxx = shutil.which("g++")
        if gxx is None:
            raise CompileError("g++ is not on PATH: the stand-in cannot compile CUDA sources for the CPU")
        root = _cache_dir() / key
        lib = root / "kernels.so"
        if not lib.is_file():
            # a private folder per build, renamed into place: parallel processes never see half a file
            root.parent.mkdir(parents=True, exist_ok=True)
            work = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root.parent))
            (work / KERNEL_FILE).write_text(source)
            (work / "launch.cpp").write_text(launcher)
            cmd = [
                gxx,
                "-std=c++17",
                "-O2",
                "-Wall",
                "-Werror",
                "-Wno-unknown-pragmas",  # nvcc's (#pragma unroll): hints for the GPU's compiler only
                "-shared",
                "-fPIC",
                "-include",
                str(SHIM),
                "-I",
                str(work),
                *flags,
                str(work / "launch.cpp"),
                "-o",
                str(work / "kernels.so"),
            ]
            run = subprocess.run(cmd, check=False, capture_output=True, text=True)
            if run.returncode != 0:
                shutil.rmtree(work, ignore_errors=True)
                raise CompileError(f"g++ failed on the kernel source ({' '.join(cmd)}):\n{run.stderr}")
            try:
                os.rename(work, root)
            except OSError:  # another process got there first: use its build
                shutil.rmtree(work, ignore_errors=True)
        _built[key] = Library(lib, kernels)
        return _built[key]


sys.modules.setdefault("_standin_kernels", sys.modules[__name__])
