"""Kernels compiled on first use: cached by source, flags and compiler; clear errors otherwise."""

from __future__ import annotations

import platform
import shutil

import pytest

from spade_edge.runtime.scoring import ccompile

pytestmark = pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")), reason="no C compiler here")


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the AMX kernel's flags are x86-64 flags")
def test_compiled_once_then_loaded_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPADE_EDGE_CACHE", str(tmp_path))
    lib = ccompile.load("amx_screen.c", ("-O1", "-mamx-tile", "-mamx-bf16", "-mavx512f", "-mavx512bf16"))
    assert hasattr(lib, "se_screen")
    (built,) = (tmp_path / "kernels").glob("amx_screen-*.so")
    stamp = built.stat().st_mtime_ns
    ccompile.load("amx_screen.c", ("-O1", "-mamx-tile", "-mamx-bf16", "-mavx512f", "-mavx512bf16"))
    assert built.stat().st_mtime_ns == stamp and len(list((tmp_path / "kernels").iterdir())) == 1


def test_compiler_errors_are_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("SPADE_EDGE_CACHE", str(tmp_path))
    with pytest.raises(RuntimeError, match="could not compile amx_screen.c"):
        ccompile.load("amx_screen.c", ("-mno-such-option",))
    monkeypatch.setenv("CC", str(tmp_path / "no-compiler"))
    with pytest.raises(RuntimeError, match="could not run the C compiler"):
        ccompile.load("amx_screen.c", ("-O1",))
    assert not list((tmp_path / "kernels").glob("*.so"))  # nothing half-written left behind
