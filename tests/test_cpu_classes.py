"""The CPU-dependent tests (scorers, kernels, CPU detection, INT8 fusion) once more as an AVX2-only
CPU (Haswell; AMD Zen 2/3 are the same class): numpy, ONNX Runtime and our code then choose the
kernels that CPU gets, so a test that leans on this machine's rounding or kernel choice fails here."""

import pytest

from tests.emulation import AVX2_ONLY, REPO, emulate, needs_emulator, run_as

# what a CPU's instruction sets can change: scorers and their kernels, resampling, decoding, the
# detector's numbers, CPU detection, INT8 fusion, metrics (not file formats or services)
SUBSET = [
    f"tests/runtime/{name}.py"
    for name in (
        "test_scoring",
        "test_fused",
        "test_fused_levels",
        "test_amx",
        "test_cpu",
        "test_cuda_kernel",
        "test_spade_reference",
        "test_compression",
        "test_resample",
        "test_images",
        "test_detector",
        "test_device",
    )
] + ["tests/test_qdq_pairs.py", "tests/test_metrics.py"]


@needs_emulator
@pytest.mark.slow
def test_cpu_dependent_tests_pass_on_an_avx2_only_cpu():
    run = emulate(AVX2_ONLY, ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", *SUBSET], timeout=1800, cwd=REPO)
    summary = run.stdout.strip().splitlines()[-1]
    print(f"as {AVX2_ONLY}: {summary}")
    assert run.returncode == 0, run.stdout[-5000:]
    assert " passed" in summary and "failed" not in summary


FUSED_AS_AVX2 = r"""
import json
import numpy as np
from spade_edge.runtime.scoring import cpu_scorer, fused
rng = np.random.default_rng(0)
q = rng.normal(size=(29, 40)).astype(np.float32)
g = rng.normal(size=(157, 40)).astype(np.float32)
g[140:] = g[100:117]  # duplicates: ties to the lower index
d = ((q[:, None].astype(np.float64) - g[None].astype(np.float64)) ** 2).sum(-1)
want = np.argsort(d, axis=1, kind="stable")[:, :4]
s = cpu_scorer()
top = s.topk(q, [g[:77], g[77:]], 4)
print(json.dumps({"level": fused.best()[0], "levels": list(fused.levels_here()), "name": s.name,
                  "path": s.stats["path"], "same": bool((top.indices == want).all())}))
"""


@needs_emulator
def test_the_fused_kernel_takes_the_avx2_level_and_is_exact_on_an_avx2_only_cpu():
    """The dispatch as an AVX2-only CPU sees it: no AVX-512 in CPUID, so the AVX2+FMA kernel is
    compiled and chosen (not the host's AVX-512 one), and it finds the float64 search's neighbours."""
    r = run_as(AVX2_ONLY, FUSED_AS_AVX2, timeout=600)
    assert r["levels"] == ["avx2", "portable"] and r["level"] == "avx2"
    assert r["name"] == "fused avx2" and r["path"] == "fused avx2"
    assert r["same"]
