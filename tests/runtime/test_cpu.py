"""runtime/cpu.py: what this CPU is, read from CPUID, so that an emulated CPU is seen as itself."""

import platform
from pathlib import Path

import pytest

from spade_edge.runtime import cpu
from tests.emulation import AVX2_ONLY, needs_emulator, run_as

REPORT = """
import json
from spade_edge.runtime import cpu
print(json.dumps({"model": cpu.model_name(), "features": cpu.features(), "int8": cpu.int8_kernel()}))
"""


def numpy_cpu_features() -> dict[str, bool]:
    """numpy's own CPUID reading (a private table, the same one np.show_runtime() prints)."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__
    except ImportError:  # numpy 1.x
        from numpy.core._multiarray_umath import __cpu_features__
    return __cpu_features__


NUMPY_NAMES = {
    "sse4_2": "SSE42",
    "avx": "AVX",
    "avx2": "AVX2",
    "fma": "FMA3",
    "f16c": "F16C",
    "avx512f": "AVX512F",
    "avx512bw": "AVX512BW",
    "avx512vl": "AVX512VL",
    "avx512_vnni": "AVX512VNNI",
    "avx512_bf16": "AVX512BF16",
    "avx512_fp16": "AVX512FP16",
}


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the CPUID reader is x86-64's")
def test_features_agree_with_numpys_cpuid():
    theirs = numpy_cpu_features()
    ours = cpu.features()
    for flag, name in NUMPY_NAMES.items():
        assert ours[flag] == theirs[name], flag
    kernel, exact = cpu.int8_kernel()
    assert exact == any(ours[f] for f in ("avx512_vnni", "avx_vnni", "amx_int8")), kernel
    assert cpu.model_name() and kernel in cpu.summary()


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="no /proc/cpuinfo")
def test_amx_needs_the_kernels_consent():
    """AMX counts only when Linux lists it (it must grant the tile state), whatever CPUID says."""
    listed = set(Path("/proc/cpuinfo").read_text().split())
    assert all(not present or flag in listed for flag, present in cpu.features().items() if flag.startswith("amx"))


@needs_emulator
def test_an_avx2_only_cpu_is_seen_as_one():
    r = run_as(AVX2_ONLY, REPORT)
    assert "Haswell" in r["model"]
    assert r["features"]["avx2"] and r["features"]["fma"]
    assert not any(r["features"][f] for f in ("avx512f", "avx512_vnni", "avx_vnni", "amx_tile"))
    assert r["int8"] == ["AVX2 VPMADDUBSW (16-bit pair sums saturate)", False]
