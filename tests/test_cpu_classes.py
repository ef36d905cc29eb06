"""The CPU-dependent tests (scorers, kernels, CPU detection, INT8 fusion) once more as an AVX2-only
CPU (Haswell; AMD Zen 2/3 are the same class): numpy, ONNX Runtime and our code then choose the
kernels that CPU gets, so a test that leans on this machine's rounding or kernel choice fails here."""

import pytest

from tests.emulation import AVX2_ONLY, REPO, emulate, needs_emulator

# what a CPU's instruction sets can change: scorers and their kernels, resampling, decoding, the
# detector's numbers, CPU detection, INT8 fusion, metrics (not file formats or services)
SUBSET = [
    f"tests/runtime/{name}.py"
    for name in (
        "test_scoring",
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
