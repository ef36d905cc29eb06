"""C kernels of the CPU scorer (``kernels/*.c``), compiled on first use by the system's C compiler
(``$CC``, else ``cc``) and kept in ``$SPADE_EDGE_CACHE/kernels`` (``~/.cache/spade-edge``), like CuPy
does with CUDA sources: no build step at install, and where no compiler is found the scorer says
why and runs on numpy instead."""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

KERNELS = Path(__file__).parent / "kernels"


def cache_dir() -> Path:
    return Path(os.environ.get("SPADE_EDGE_CACHE", Path.home() / ".cache" / "spade-edge")) / "kernels"


def load(source: str, flags: tuple[str, ...]) -> ctypes.CDLL:
    """``kernels/<source>`` as a shared library; compiled once per source, flags and compiler.
    Raises RuntimeError naming what is missing."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise RuntimeError("no C compiler found (install gcc, or set $CC)")
    text = (KERNELS / source).read_bytes()
    key = hashlib.sha256(text + " ".join((cc, *flags)).encode()).hexdigest()[:16]
    lib = cache_dir() / f"{Path(source).stem}-{key}.so"
    if not lib.exists():
        lib.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:  # compile aside, then rename: no half-written library
            out = Path(tmp) / lib.name
            try:
                run = subprocess.run(
                    [cc, *flags, "-shared", "-fPIC", "-o", str(out), str(KERNELS / source)],
                    capture_output=True,
                    text=True,
                )
            except OSError as exc:
                raise RuntimeError(f"could not run the C compiler {cc!r}: {exc}") from exc
            if run.returncode:
                raise RuntimeError(f"{cc} could not compile {source}: {run.stderr.strip()[-500:]}")
            os.replace(out, lib)
    return ctypes.CDLL(str(lib))
