"""Run Python on another kind of x86 CPU than this one: QEMU's user-mode emulator (Debian's
qemu-user) executes this interpreter with the CPUID of the model asked for, so numpy, ONNX Runtime
and our own code choose the kernels that CPU would get. What it reaches: the AVX2 + FMA class
(Haswell, AMD Zen 2/3: no AVX-512, no VNNI) from any x86-64 host. QEMU 7.2 has no AVX-512, so the
AVX-512 and AMX classes are tested only on hosts that have them."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
AVX2_ONLY = "Haswell"  # AVX2, FMA, F16C; no AVX-512, no VNNI: the class of Zen 3 and most industrial PCs

EMULATED = "SPADE_EDGE_TEST_EMULATED"  # set in the emulated process: it runs no emulator of its own
needs_emulator = pytest.mark.skipif(
    platform.machine() != "x86_64" or shutil.which("qemu-x86_64") is None or EMULATED in os.environ,
    reason="needs qemu-x86_64 on an x86-64 host, not itself emulated (Debian: apt-get install qemu-user; "
    ".ci/run installs it)",
)


def emulate(cpu: str, args: list[str], timeout: float = 600, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run this interpreter with ``args`` as ``cpu`` would."""
    env = {**os.environ, EMULATED: cpu}
    return subprocess.run(
        ["qemu-x86_64", "-cpu", cpu, sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=cwd,
    )


def run_as(cpu: str, code: str, *args: str, timeout: float = 600) -> dict:
    """Run ``code`` (Python printing one JSON line last) as ``cpu`` would; its JSON result."""
    proc = emulate(cpu, ["-c", code, *args], timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
