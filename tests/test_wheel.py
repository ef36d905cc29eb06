"""What a plain ``pip install`` delivers (issue 14): the kernel sources ship in the wheel and the sdist,
and from an installed copy in a clean environment every CPU scorer this machine supports is the one
in use and agrees with the fp32 numpy path. The C kernels are compiled on first use from the
installed sources (runtime/scoring/ccompile.py): a missing source does not fail, it silently turns a
scorer into numpy, which is why this test looks at the installed copy and not the repository."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
import venv
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest

from spade_edge.runtime import cpu
from spade_edge.runtime.scoring import fused

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the [line] extra brings tomli
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
KERNELS = Path("runtime/scoring/kernels")  # in the repository; spade_edge/runtime/scoring/kernels installed
KERNEL_SUFFIXES = (".c", ".h", ".cu", ".cuh")


@dataclass(frozen=True)
class CpuScorer:
    """A CPU scorer chosen by CPU feature. ``module`` (under spade_edge.runtime.scoring) exposes
    ``available() -> (bool, why)`` and ``FLAGS``, the compiler flags of its kernel ``kernel``."""

    module: str
    scorer: str  # its PixelScorer class
    cpu_flags: tuple[str, ...]  # runtime.cpu flags it needs, besides a C compiler
    feature: str  # what ``why`` names when the CPU lacks them
    kernel: str  # its source in kernels/
    paths: tuple[str, ...]  # its ``stats["path"]`` for a small pyramid when its kernels ran


# a scorer added later is one more line here
CPU_SCORERS = (
    CpuScorer("amx", "AmxScorer", ("amx_tile", "amx_bf16", "avx512f", "avx512_bf16"), "AMX", "amx_screen.c", ("amx",)),
    # the fused kernels: a portable level everywhere; small pyramids take the kernel's per-level cost, or
    # where the CPU has AVX512-BF16 and the pyramid is wide, the bf16 pyramid screen
    CpuScorer(
        "fused",
        "FusedScorer",
        (),
        "fused",
        "fused.c",
        (
            "avx512bf16 screen",
            *(f"fused {level} levels" for level in fused.LEVELS),
        ),
    ),
)

# Run by the clean environment's python, in an empty folder: reports where spade_edge came from,
# each table scorer's availability, and compares every available scorer (and cpu_scorer())
# with NumpyScorer on the same random pyramid features.
CHECK = r"""
import importlib, json, sys
from pathlib import Path

import numpy as np
from numpy.testing import assert_allclose, assert_array_equal

import spade_edge
from spade_edge.runtime.scoring import NumpyScorer, ccompile, cpu_scorer

table = json.loads(sys.argv[1])
rng = np.random.default_rng(0)
grid, kappa = (20, 20), 3
shapes = [(20, 20, 40), (10, 10, 70), (5, 5, 130)]  # three levels on a 20 x 20 grid, as a small backbone gives


def pyramid():
    return [rng.standard_normal(s, dtype=np.float32) for s in shapes]


query, gallery = pyramid(), [pyramid() for _ in range(5)]
ref = NumpyScorer().topk_pyramid(query, gallery, grid, kappa)


def agrees(scorer):
    top = scorer.topk_pyramid(query, gallery, grid, kappa)
    assert_array_equal(top.indices, ref.indices, err_msg=f"{scorer!r}: neighbours differ from NumpyScorer's")
    assert_allclose(top.distances, ref.distances, rtol=1e-5, err_msg=f"{scorer!r}: distances differ")
    return getattr(scorer, "stats", {}).get("path")


report = {"file": spade_edge.__file__, "kernels": str(ccompile.KERNELS), "scorers": {}}
for entry in table:
    module = importlib.import_module(f"spade_edge.runtime.scoring.{entry['module']}")
    ok, why = module.available()
    so = sorted(p.name for p in ccompile.cache_dir().glob(Path(entry["kernel"]).stem + "-*.so"))
    path = agrees(getattr(module, entry["scorer"])()) if ok else None
    try:  # the installed source compiles whatever this CPU is (running it is another matter)
        compiled = ccompile.load(entry["kernel"], module.FLAGS)._name
    except RuntimeError as exc:
        compiled = f"failed: {exc}"
    report["scorers"][entry["module"]] = {"available": ok, "why": why, "so": so, "path": path, "compiled": compiled}
chosen = cpu_scorer()
agrees(chosen)
report["cpu_scorer"] = type(chosen).__name__
print(json.dumps(report))
"""


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{cmd[:4]} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def _clean_copy(dest: Path) -> None:
    """The repository's files as a fresh checkout has them, with uncommitted work but without
    ignored ones: a stale build/ or *.egg-info/SOURCES.txt in the working tree would put files
    into the wheel or sdist that the package data no longer names."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for name in filter(None, listed.split("\0")):
        src = REPO / name
        if src.is_file():  # tracked files deleted in the working tree are listed too
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


@pytest.mark.slow
def test_installed_wheel_ships_and_runs_the_kernels() -> None:
    kernels = sorted(p.name for p in (REPO / KERNELS).iterdir() if p.suffix in KERNEL_SUFFIXES)
    assert "amx_screen.c" in kernels and "topk.cu" in kernels  # the glob sees what we know is there
    build_system = tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]
    # pip and the build must not pick up the caller's environment (PYTHONPATH, an activated venv)
    env = {
        k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "SPADE_EDGE_AMX")
    }
    times: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="spade-edge-wheel-") as tmp_name:
        tmp = Path(tmp_name)
        src, dist, env_dir, work = tmp / "src", tmp / "dist", tmp / "venv", tmp / "work"
        for d in (src, dist, work):
            d.mkdir()
        _clean_copy(src)
        # one made-up source of every kind: the package data must cover kernels not written yet
        probes = [f"wheel_probe{suffix}" for suffix in KERNEL_SUFFIXES]
        for name in probes:
            (src / KERNELS / name).write_text("/* tests/test_wheel.py */\n")

        # A clean environment: no system site-packages, nothing from the test's venv. It gets the
        # build backend that pyproject names (what build isolation would fetch), then the wheel.
        start = time.perf_counter()
        venv.EnvBuilder(with_pip=True).create(env_dir)
        py = str(env_dir / "bin" / "python")
        _run([py, "-m", "pip", "install", "-q", *build_system["requires"]], work, env)
        times["environment"] = time.perf_counter() - start

        start = time.perf_counter()
        _run(
            [py, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist), str(src)], work, env
        )
        _run(
            [
                py,
                "-c",
                "import importlib, sys; importlib.import_module(sys.argv[1]).build_sdist(sys.argv[2])",
                build_system["build-backend"],
                str(dist),
            ],
            src,
            env,
        )  # the PEP 517 hook, as `python -m build --sdist`
        (wheel,), (sdist,) = dist.glob("spade_edge-*.whl"), dist.glob("spade_edge-*.tar.gz")
        times["build"] = time.perf_counter() - start

        in_wheel = set(zipfile.ZipFile(wheel).namelist())
        with tarfile.open(sdist) as tar:
            in_sdist = set(tar.getnames())
        root = sdist.name.removesuffix(".tar.gz")
        for name in kernels + probes:
            assert f"spade_edge/{KERNELS.as_posix()}/{name}" in in_wheel, f"{name} not in {wheel.name}"
            assert f"{root}/{KERNELS.as_posix()}/{name}" in in_sdist, f"{name} not in {sdist.name}"

        # the runtime dependencies come from the wheel's own metadata: they must be enough to score
        start = time.perf_counter()
        _run([py, "-m", "pip", "install", "-q", str(wheel)], work, env)
        times["install"] = time.perf_counter() - start

        cache = tmp / "cache"  # kernels compiled from the installed sources, not found in ~/.cache
        start = time.perf_counter()
        out = _run(
            [py, "-I", "-c", CHECK, json.dumps([asdict(s) for s in CPU_SCORERS])],
            work,
            {**env, "SPADE_EDGE_CACHE": str(cache)},
        )
        times["check"] = time.perf_counter() - start
        report = json.loads(out.strip().splitlines()[-1])

        assert Path(report["file"]).resolve().is_relative_to(env_dir.resolve()), (
            f"spade_edge imported from {report['file']}"
        )
        assert Path(report["kernels"]).resolve().is_relative_to(env_dir.resolve())
        flags = cpu.flags()
        compiler = bool(env.get("CC") or shutil.which("cc") or shutil.which("gcc"))  # as ccompile looks for one
        available = []
        for entry in CPU_SCORERS:
            got = report["scorers"][entry.module]
            has_cpu = set(entry.cpu_flags) <= flags
            print(
                f"CPU scorer {entry.module}: {'available' if got['available'] else 'not available'} "
                f"on this CPU ({got['why']}); kernel compiled from the installed source: {got['compiled']}"
            )
            assert got["available"] == (has_cpu and compiler), got
            if compiler:
                assert Path(got["compiled"]).resolve().is_relative_to(cache.resolve()), got["compiled"]
            if got["available"]:
                available.append(entry.scorer)
                assert got["so"], f"no {entry.kernel} library compiled into {cache}"
                assert got["path"] in entry.paths, f"{entry.scorer} took path {got['path']}"
            else:
                assert (entry.feature if not has_cpu else "compiler") in got["why"], got["why"]
        # cpu_scorer() takes one of the available scorers, numpy where there is none
        assert report["cpu_scorer"] in (available or ["NumpyScorer"]), report["cpu_scorer"]
    print(f"cpu_scorer() = {report['cpu_scorer']}; seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in times.items()))
